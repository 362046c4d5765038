"""Norms: RMSNorm (Llama's and Gemma's op order) and LayerNorm as functions, and Norm, a model's norm as data (exit
heads fuse it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same op order as transformers' LlamaRMSNorm (fp32 statistics, cast back before the weight).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's op order: the weight is applied in float32, then the result is cast back. Gemma checkpoints store w
    and multiply by (1 + w): pass that sum as `weight` (float32, so it is not rounded to the model's dtype)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@dataclass
class Norm:
    """A model's norm as data, so that exit heads can fuse it: kind 'rms' (Llama), 'rms_fp32' (Gemma: weight applied
    in float32) or 'layer'."""

    kind: str
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms":
            return rms_norm(x, self.weight, self.eps)
        if self.kind == "rms_fp32":
            return rms_norm_fp32(x, self.weight, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)

    @property
    def fused_kind(self) -> str:
        """The norm the fused exit head computes: its RMS path applies the weight in float32, as Gemma does."""
        return "rms" if self.kind == "rms_fp32" else self.kind
