"""Decoder-layer elementwise ops: RMSNorm, rotary embedding, SiLU-and-mul.

Each has a plain torch reference (the oracle, and the path on GPUs or without helios._C) and a one-pass C++ kernel
on CPU (csrc/cpu/layer_ops.cpp) that rounds where the reference rounds. At decode batch sizes the reference's
5-15 small ops per call cost more in dispatch than in arithmetic: the kernels take ~1/3 of a SmolLM2 decode
step's overhead out (see the step profile in the README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helios.ops.norm import rms_norm as rms_norm_reference


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                     sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [tokens, heads, dim], k [tokens, kv_heads, dim] rotated by the table rows at `positions` (rotate-half)."""
    cos = cos_table[positions].unsqueeze(1)  # [tokens, 1, head_dim]
    sin = sin_table[positions].unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class LayerOps:
    """The implementation of the layer ops for one model, chosen once when the model is built: "fused" (helios._C
    kernels, CPU only) or "native" (the torch references)."""

    def __init__(self, device: torch.device, backend: str | None = None):
        if backend is None:
            from helios._ext import extension_available

            backend = "fused" if device.type == "cpu" and extension_available() else "native"
        if backend not in {"fused", "native"}:
            raise ValueError(f"layer ops backend must be 'fused' or 'native', got {backend!r}")
        if backend == "fused" and device.type != "cpu":
            raise ValueError(f"the fused layer ops run on CPU only, not on {device.type}")
        self.backend = backend
        self.fused = backend == "fused"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self.fused:
            return torch.ops.helios.rms_norm(x, weight, eps)
        return rms_norm_reference(x, weight, eps)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
               sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused path rotates q and k in place (they are fresh projections) and returns them."""
        if self.fused:
            torch.ops.helios.rotary_embedding(positions, q, k, cos_table, sin_table)
            return q, k
        return rotary_reference(q, k, positions, cos_table, sin_table)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return torch.ops.helios.silu_and_mul(x)
        return silu_and_mul_reference(x)
