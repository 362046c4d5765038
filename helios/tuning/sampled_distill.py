"""Self-distillation over a candidate set of tokens, for vocabularies too large for full-vocabulary KL per step
(Gemma 3: 262k tokens, where one student pass over the LM head costs more than the frozen forward).

Once per kept position (while the frozen model runs), the teacher's full distribution gives its top-K tokens and
its exact log-normalizer. Each training step then works on candidates C = the union of the batch's teacher top-K
tokens, plus S tokens drawn uniformly from the rest of the vocabulary to estimate the student's tail mass:
    teacher  p_c = exp(t_c − lse_T) for c in C (exact),           p_tail = 1 − Σ_C p_c
    student  log T̂ = logsumexp(z_u over the S samples) + log((V − |C|) / S)
             log q_c = z_c − logsumexp(z_C, log T̂),                 log q_tail = log T̂ − logsumexp(z_C, log T̂)
    loss = KL over C ∪ {tail} + α·CE(teacher argmax)
Only [batch, |C| + S] logits are ever computed (|C| is a few thousand), and autograd does the rest. The tail
estimate is unbiased for the tail's sum; what a student puts on tokens outside C is seen only through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LSE_CHUNK = 8192  # vocabulary rows per chunk when the teacher's full logits are reduced to top-K + lse


@dataclass
class TopKTeacher:
    """Per position: the teacher's top-K token ids (best first) and the log-normalizer of its full logits."""

    top: torch.Tensor  # int64 [n, K]
    lse: torch.Tensor  # float32 [n]


@torch.no_grad()
def topk_teacher(logits_of, x_final: torch.Tensor, k: int) -> TopKTeacher:
    """Reduces the teacher's full-vocabulary logits (computed by `logits_of`, the model's packed LM head) to
    top-K ids and logsumexp, a few rows at a time."""
    tops, lses = [], []
    for start in range(0, x_final.shape[0], 256):
        z = logits_of(x_final[start:start + 256]).float()
        tops.append(z.topk(k, dim=-1).indices)
        lses.append(torch.logsumexp(z, dim=-1))
    return TopKTeacher(torch.cat(tops), torch.cat(lses))


@dataclass
class Candidates:
    """One batch's candidate tokens: C (every teacher top-K token of the batch) and uniform tail samples U, with
    their LM-head rows gathered once for the teacher and every exit."""

    weights: torch.Tensor  # [|C|, d]: LM-head rows of C
    sample_weights: torch.Tensor  # [|U|, d]: LM-head rows of U (none of them in C)
    log_tail_scale: float  # log((V − |C|) / |U|)
    target: torch.Tensor  # int64 [n]: index in C of each row's teacher argmax


def candidates(top: torch.Tensor, head_weight: torch.Tensor, tail_samples: int,
               generator: torch.Generator) -> Candidates:
    vocab = head_weight.shape[0]
    tokens, inverse = torch.unique(top, return_inverse=True)
    drawn = torch.randint(0, vocab, (tail_samples,), generator=generator).to(top.device)
    samples = drawn[~torch.isin(drawn, tokens)]
    rest = vocab - tokens.numel()
    scale = math.log(rest / max(1, samples.numel())) if rest > 0 else 0.0
    return Candidates(head_weight[tokens].float(), head_weight[samples].float(), scale, inverse[:, 0])


@torch.no_grad()
def teacher_probs(x_final: torch.Tensor, lse: torch.Tensor, cand: Candidates):
    """(p over C [n, |C|], p_tail [n]) from the teacher's logits on C and its exact log-normalizer."""
    p = torch.exp(x_final.float() @ cand.weights.T - lse[:, None])
    return p, (1.0 - p.sum(-1)).clamp_min(0.0)


def student_loss(x: torch.Tensor, p: torch.Tensor, p_tail: torch.Tensor, cand: Candidates,
                 ce_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean KL(p ‖ q) over C ∪ {tail} + ce_weight·CE, differentiable in x [n, d]; and per-batch sums of KL, CE and
    top-1 agreement (within C) for reporting."""
    z = x.float() @ cand.weights.T  # [n, |C|]
    if cand.sample_weights.shape[0] == 0:  # C is the whole vocabulary: there is no tail
        log_q = torch.log_softmax(z, dim=-1)
        tail_term = 0.0
    else:
        log_tail = torch.logsumexp(x.float() @ cand.sample_weights.T, dim=-1) + cand.log_tail_scale
        log_norm = torch.logsumexp(torch.cat([z, log_tail[:, None]], dim=-1), dim=-1)
        log_q = z - log_norm[:, None]
        tail_term = torch.xlogy(p_tail, p_tail) - p_tail * (log_tail - log_norm)
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1) + tail_term
    ce = -log_q.gather(1, cand.target[:, None])[:, 0]
    loss = (kl + ce_weight * ce).mean()
    stats = {"kl": float(kl.detach().sum()), "ce": float(ce.detach().sum()),
             "agree": int((z.detach().argmax(-1) == cand.target).sum())}
    return loss, stats
