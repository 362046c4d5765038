"""Row-wise softmax statistics for exit tuning: in-place ops over [rows, vocab] float32 logits.

softmax_rows_(z)                 z ← softmax(z); returns (Σ p log p, argmax z) per row
distill_rows_(z, p, t, α, s, g)  returns (−Σ p log q, −log q[t], argmax z) per row, q = softmax(z); with g,
                                 z ← s·((1 + α)·q − p − α·onehot(t)), the gradient of s·(KL(p‖q) + α·CE(t, q))
On CPU they run as one fused kernel per row in helios._C (a row stays in cache); elsewhere, or without the
extension, the torch references below run (they are also the tests' oracle).
"""

from __future__ import annotations

import torch

from helios._ext import extension_available


def _native(logits: torch.Tensor) -> bool:
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous()
            and extension_available())


def softmax_rows_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    argmax = logits.argmax(-1)
    logp = torch.log_softmax(logits, dim=-1)
    logits.copy_(logp.exp())
    return (logits * logp).sum(-1), argmax


def distill_rows_reference(logits: torch.Tensor, probs: torch.Tensor, target: torch.Tensor, ce_weight: float,
                           grad_scale: float, write_grad: bool):
    argmax = logits.argmax(-1)
    logq = torch.log_softmax(logits, dim=-1)
    cross = -(probs * logq).sum(-1)
    ce = -logq.gather(1, target[:, None]).squeeze(1)
    if write_grad:
        grad = (1 + ce_weight) * logq.exp() - probs
        grad.scatter_add_(1, target[:, None], torch.full_like(ce[:, None], -ce_weight))
        logits.copy_(grad * grad_scale)
    return cross, ce, argmax


def softmax_rows_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _native(logits):
        return torch.ops.helios.softmax_rows_(logits)
    return softmax_rows_reference(logits)


def distill_rows_(logits: torch.Tensor, probs: torch.Tensor, target: torch.Tensor, ce_weight: float = 0.0,
                  grad_scale: float = 1.0, write_grad: bool = True):
    if _native(logits) and probs.is_contiguous() and target.is_contiguous():
        return torch.ops.helios.distill_rows_(logits, probs, target, float(ce_weight), float(grad_scale), write_grad)
    return distill_rows_reference(logits, probs, target, ce_weight, grad_scale, write_grad)
