"""Loads the compiled extension helios._C once, with an error that says how to build it."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def load_extension() -> ModuleType:
    try:
        from helios import _C
    except ImportError as e:
        raise ImportError(
            "helios._C (the paged KV cache extension) is not built or failed to load: "
            f"{e}. Build it with `pip install torch==2.13.0 ninja && pip install --no-build-isolation -e .` "
            "from the helios-serve checkout (HELIOS_BUILD_EXT=cpu skips CUDA)."
        ) from e
    from helios.ops import cache as _register_fake_impls  # noqa: F401  (fake kernels for torch.compile/opcheck)

    return _C


def extension_available() -> bool:
    try:
        load_extension()
    except ImportError:
        return False
    return True
