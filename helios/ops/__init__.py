"""Ops: each has a native torch reference (test oracle, fallback path) and compiled implementations.

The implementation is chosen once, by device, when the owning object is built, never per call.
"""

from helios.ops.attention import AttentionMetadata, PagedAttentionOps

__all__ = ["AttentionMetadata", "PagedAttentionOps"]
