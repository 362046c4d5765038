"""Self-distillation loss for exit adapters, with the frozen LM head's part done by hand.

The teacher is the final layer's distribution p = softmax(W·x_T); the student at an exit is q = softmax(W·x)
with x = the adapted, normalized exit hidden state. Per token:
    loss = KL(p ‖ q) + α·CE(argmax p, q)
    ∂loss/∂z = (1 + α)·q − p − α·onehot(argmax p)       (z = W·x, the student's logits)
    ∂loss/∂x = (∂loss/∂z)·W
W is frozen and [vocab, d] large, so autograd would keep [tokens, vocab] tensors per exit alive until the
backward pass; doing the head by hand keeps one row chunk at a time, reuses the logits buffer for the
gradient, and lets the softmax statistics run as one fused pass per row (helios.ops.softmax_rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helios.ops.softmax_rows import distill_rows_, softmax_rows_

ROW_CHUNK = 1024  # rows of [rows, vocab] fp32 logits at a time (200 MB for SmolLM2's 49k vocabulary)


@dataclass
class Teacher:
    """The final layer's side of one batch, computed once and shared by every exit."""

    probs: torch.Tensor  # [n, vocab] softmax of the final logits
    neg_entropy: torch.Tensor  # [n] Σ p log p, so that KL = Σ p log p − Σ p log q
    tokens: torch.Tensor  # [n] argmax (what the full model would emit greedily)


@torch.no_grad()
def teacher_targets(x_final: torch.Tensor, head_weight: torch.Tensor) -> Teacher:
    probs = x_final.float() @ head_weight.T
    neg_entropy, tokens = softmax_rows_(probs)
    return Teacher(probs, neg_entropy, tokens)


@dataclass
class DistillResult:
    kl: float  # summed over rows
    ce: float  # summed over rows: −log q(argmax p)
    agree: int  # rows whose student argmax equals the teacher's
    grad: torch.Tensor | None  # ∂(mean loss)/∂x, when asked for


@torch.no_grad()
def distill(x: torch.Tensor, head_weight: torch.Tensor, teacher: Teacher, ce_weight: float = 0.0,
            want_grad: bool = True, row_chunk: int = ROW_CHUNK) -> DistillResult:
    """Loss statistics of student head inputs x [n, d] against `teacher`, and the gradient of the mean loss
    (KL + ce_weight·CE) with respect to x."""
    n = x.shape[0]
    x = x.float()
    grad = torch.empty_like(x) if want_grad else None
    kl = ce = 0.0
    agree = 0
    for start in range(0, n, row_chunk):
        rows = slice(start, min(start + row_chunk, n))
        target = teacher.tokens[rows]
        z = x[rows] @ head_weight.T
        cross, ce_rows, argmax = distill_rows_(z, teacher.probs[rows], target, ce_weight, 1.0 / n, want_grad)
        kl += float((teacher.neg_entropy[rows] + cross).sum())
        ce += float(ce_rows.sum())
        agree += int((argmax == target).sum())
        if want_grad:
            grad[rows] = z @ head_weight  # z now holds ∂loss/∂z
    return DistillResult(kl, ce, agree, grad)
