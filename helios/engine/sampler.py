"""Next-token choice from last-position logits: greedy rows by argmax, the rest by temperature/top-k/top-p."""

from __future__ import annotations

import torch

from helios.engine.sequence import Sequence


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None = None) -> list[int]:
    """logits: float [len(seqs), vocab] on any device. Returns one token id per sequence."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            tokens.append(greedy[row])
            continue
        scaled = _filter_top_k_top_p(logits[row].float().cpu() / p.temperature, p.top_k, p.top_p)
        probs = scaled.softmax(-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=seq.generator or generator).item()))
    return tokens
