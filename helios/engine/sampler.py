"""Next-token choice from last-position logits, with vLLM's definitions of every SamplingParams knob.

Per row, in vLLM's order: repetition penalty (tokens of the prompt or the output: logit / p when positive,
logit * p when negative), frequency and presence penalties (output tokens: − f·count, − p·[count > 0]), the
min_tokens mask (EOS and stop tokens at −inf until min_tokens are out); then greedy rows take the argmax, and
sampled rows divide by the temperature, drop tokens below min_p × the top probability, apply top-k and top-p, and
draw. Logprobs are those of the distribution the token was actually chosen from (greedy: the penalized logits).
Rows that need none of this (plain greedy) take one batched argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helios.engine.sequence import Sequence


@dataclass
class TokenLogprobs:
    """The chosen token's log-probability and rank (1 = most likely), plus the top-k (token, logprob) pairs."""

    token: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


def needs_logits(seq: Sequence) -> bool:
    """Whether this row's choice needs its full logits (a plain greedy row only needs the argmax)."""
    p = seq.params
    return not p.greedy or p.penalized or p.logprobs is not None or seq.num_output_tokens < p.min_tokens


def apply_penalties(logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int], repetition: float,
                    frequency: float, presence: float) -> torch.Tensor:
    """vLLM's repetition, frequency and presence penalties on one row of logits [vocab] (returns a new tensor)."""
    logits = logits.clone()
    vocab = logits.shape[0]
    if repetition != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.int64, device=logits.device)
        if seen.numel():
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / repetition, values * repetition)
    if (frequency != 0.0 or presence != 0.0) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.int64, device=logits.device), minlength=vocab)
        counts = counts[:vocab].to(logits.dtype)
        logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """min-p, then top-k, then top-p on one row of (temperature-scaled) logits; dropped tokens become −inf."""
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def process_row(logits: torch.Tensor, seq: Sequence, stop_ids: set[int]) -> torch.Tensor:
    """The distribution row `seq` draws from, as float32 logits (−inf = impossible)."""
    p = seq.params
    logits = logits.float()
    if p.penalized:
        logits = apply_penalties(logits, seq.prompt_token_ids, seq.output_token_ids, p.repetition_penalty,
                                 p.frequency_penalty, p.presence_penalty)
    if seq.num_output_tokens < p.min_tokens:
        banned = (set() if p.ignore_eos else stop_ids) | set(p.stop_token_ids or [])
        banned = [t for t in banned if t < logits.shape[0]]
        if banned:
            logits = logits.index_fill(0, torch.tensor(banned, device=logits.device), float("-inf"))
    if p.greedy:
        return logits
    return filter_logits(logits / p.temperature, p.top_k, p.top_p, p.min_p)


def token_logprobs(log_probs: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    value = log_probs[token]
    rank = int((log_probs > value).sum().item()) + 1
    top = torch.topk(log_probs, min(k, log_probs.shape[0])) if k > 0 else None
    pairs = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return TokenLogprobs(token, float(value), rank, pairs)


def prompt_token_logprobs(logits_of, hidden: torch.Tensor, prompt_ids: list[int], k: int,
                          chunk: int = 512) -> list[TokenLogprobs]:
    """Logprobs of prompt tokens 1.. given the hidden states of positions 0..len-2 (`logits_of` maps hidden rows to
    logits); computed in chunks so that [prompt, vocab] logits never exist at once."""
    entries = []
    for start in range(0, len(prompt_ids) - 1, chunk):
        log_probs = logits_of(hidden[start:start + chunk]).float().log_softmax(-1)
        for row, token in zip(log_probs, prompt_ids[start + 1:start + 1 + chunk], strict=False):
            entries.append(token_logprobs(row, token, k))
    return entries


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None = None,
           stop_ids: set[int] | frozenset[int] = frozenset()) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [len(seqs), vocab] on any device. Returns one token per sequence and, for sequences that asked for
    logprobs, their TokenLogprobs (None otherwise)."""
    tokens: list[int] = [0] * len(seqs)
    logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
    special = [i for i, s in enumerate(seqs) if needs_logits(s)]
    if len(special) < len(seqs):
        greedy = logits.argmax(dim=-1).tolist()
        for i in set(range(len(seqs))) - set(special):
            tokens[i] = greedy[i]
    for i in special:
        seq = seqs[i]
        row = process_row(logits[i], seq, set(stop_ids))
        if seq.params.greedy:
            token = int(row.argmax().item())
        else:
            probs = row.softmax(-1).cpu()  # draws on the CPU generator: reproducible on every device
            token = int(torch.multinomial(probs, 1, generator=seq.generator or generator).item())
        tokens[i] = token
        if seq.params.logprobs is not None:
            logprobs[i] = token_logprobs(row.log_softmax(-1), token, seq.params.logprobs)
    return tokens, logprobs
