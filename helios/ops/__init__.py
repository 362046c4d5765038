"""Ops: each has a native torch reference (test oracle, fallback path) and compiled implementations.

The implementation is chosen once, by device, when the owning object is built, never per call.
`helios.ops.exit_head(...)` is the fused exit-head function; its module stays importable as
`from helios.ops.exit_head import PackedHead, exit_head_native, ...` (or importlib.import_module).
"""

from helios.ops.attention import AttentionMetadata, PagedAttentionOps
from helios.ops.exit_head import exit_head  # the function shadows its module's name on purpose (README API)

__all__ = ["AttentionMetadata", "PagedAttentionOps", "exit_head"]
