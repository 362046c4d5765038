"""Device and dtype resolution shared by the engine, CLI and tests."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def has_cuda() -> bool:
    return torch.cuda.is_available()


def auto_device() -> torch.device:
    """What device="auto" means: the current CUDA device when torch sees one, else the CPU."""
    return torch.device("cuda" if has_cuda() else "cpu")


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        resolved = device
    elif isinstance(device, str):
        if device == "auto":
            return auto_device()
        try:
            resolved = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device={device!r} is not a device: use 'auto', 'cpu' or 'cuda[:N]'") from e
    else:
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    if resolved.type not in {"cpu", "cuda"}:
        raise ValueError(f"device={device!r}: helios runs on 'cpu' and 'cuda'")
    if resolved.type == "cuda" and not has_cuda():
        raise ValueError(f"device={device!r} but torch sees no CUDA device")
    return resolved


def _named_dtype(value: str | torch.dtype, field: str) -> torch.dtype | None:
    """The torch dtype a dtype argument names (None for 'auto'), or an error naming `field`."""
    if isinstance(value, torch.dtype):
        if value not in set(_DTYPES.values()):
            raise ValueError(f"{field}={value} is not supported: use float32, bfloat16 or float16")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a string or torch.dtype, got {type(value).__name__}")
    if value == "auto":
        return None
    if value.lower() not in _DTYPES:
        raise ValueError(f"{field}={value!r} is not supported: use 'auto', 'float32', 'bfloat16' or 'float16'")
    return _DTYPES[value.lower()]


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """'auto' = float32 on CPU (exact parity; pass 'bfloat16' for speed), the checkpoint's half type on CUDA."""
    resolved = _named_dtype(dtype, "dtype")
    if resolved is not None:
        return resolved
    if device.type == "cpu":
        return torch.float32
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def resolve_kv_cache_dtype(kv_cache_dtype: str | torch.dtype, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV pool's dtype: 'auto' = the model's. On CPU a float32 model may keep its cache as float16 or bfloat16
    (half the KV bytes: twice the sequences in a memory budget, half the attention's reads per decode step; keys
    and values are rounded as they are stored). CUDA kernels keep the cache in the model's dtype."""
    resolved = _named_dtype(kv_cache_dtype, "kv_cache_dtype")
    if resolved is None or resolved == dtype:
        return dtype
    if device.type != "cpu":
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} on {device.type}: the CUDA kernels keep the KV cache in "
                         f"the model's dtype ({str(dtype).removeprefix('torch.')}); use 'auto'")
    if dtype != torch.float32 or resolved == torch.float32:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} with dtype={str(dtype).removeprefix('torch.')}: a "
                         "narrower cache is for float32 models (float16 or bfloat16); use 'auto'")
    return resolved
