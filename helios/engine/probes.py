"""Profiling probes: while a profile is being taken, every generated token is also evaluated at every probe exit
layer (confidence, and whether that exit's top-1 token equals the final layer's), the prompt's and the output's
negative log-likelihood under the full model are kept, and layer and exit-check time are measured. The control
plane turns these records into live thresholds, a depth, an exit set and a cost model.

The runner fills a ProbeLog at full depth; it never changes which token a sequence gets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from helios.model.base import DecoderModel

PROMPT_CHUNK = 256  # prompt rows scored at once (where full logits are needed: [rows, vocab] at once)
CHECK_TIMED, CHECK_EVERY = 4, 8  # exit-check timing: the first 4 probed steps, then every 8th


def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work, so that host timers measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class ProbeLog:
    layers: tuple[int, ...]  # the probed exit layers (1-based, below the loaded depth)
    confidence: str = "max_prob"
    values: dict[int, list[float]] = field(default_factory=dict)  # per layer, per token: the confidence measure
    agree: dict[int, list[bool]] = field(default_factory=dict)  # per layer, per token: top-1 == final top-1
    output_nats: dict[str, list[float]] = field(default_factory=dict)  # request id -> -ln p of each output token
    prompt_nats: dict[str, float] = field(default_factory=dict)  # request id -> -ln p of prompt tokens 1..n-1
    layer_seconds: float = 0.0  # time in the layer stack, summed over steps
    layer_steps: int = 0  # layer applications timed (steps x loaded layers)
    check_seconds: float = 0.0  # time of exit checks (fused exit head on the batch's last rows)
    check_steps: int = 0  # steps whose exit check was timed on its own
    untimed_steps: int = 0
    tokens: int = 0

    def __post_init__(self) -> None:
        for layer in self.layers:
            self.values.setdefault(layer, [])
            self.agree.setdefault(layer, [])

    @property
    def seconds_per_layer(self) -> float:
        return self.layer_seconds / max(1, self.layer_steps)

    @property
    def seconds_per_check(self) -> float:
        return self.check_seconds / max(1, self.check_steps)

    def record_greedy(self, model: DecoderModel, states: dict[int, torch.Tensor],
                      rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy rows (CPU): (token, p1) of the last layer and every probe exit through the fused head in one read
        of the LM head, no [batch, vocab] logits. The first CHECK_TIMED steps, then every CHECK_EVERY-th, time the
        last layer's head alone instead (one exit check on these rows: seconds_per_check) and the probes apart."""
        step = self.check_steps + self.untimed_steps  # probed steps before this one
        if self.check_steps < CHECK_TIMED or (step - CHECK_TIMED) % CHECK_EVERY == CHECK_EVERY - 1:
            start = time.perf_counter()
            token, p1 = model.greedy_head(rows)
            self.add_check_time(time.perf_counter() - start)
            results = model.exit_head_batch(states)
        else:
            self.untimed_steps += 1
            results = model.exit_head_batch({**states, None: rows})  # None: the last layer (final norm)
            token, p1 = results.pop(None)[:2]
        self.record_exit_results(results, token)
        return token, p1

    def record_exits(self, model: DecoderModel, states: dict[int, torch.Tensor], final_tokens: torch.Tensor) -> None:
        """Evaluates each probe layer's exit on the rows' hidden states (the runtime's own fused exit head). The
        first probe layer is checked alone and timed: that is what one exit check costs while serving (the cost
        model's seconds_per_check). The others go through the LM head together (DecoderModel.exit_head_batch: on CPU
        one read of the head for all of them, the same per-row results)."""
        first, *rest = self.layers
        synchronize(final_tokens.device)
        start = time.perf_counter()
        results = {first: model.exit_head(states[first], first)}
        synchronize(final_tokens.device)
        self.add_check_time(time.perf_counter() - start)
        if rest:
            results.update(model.exit_head_batch({layer: states[layer] for layer in rest}))
        self.record_exit_results(results, final_tokens)

    def add_check_time(self, seconds: float) -> None:
        self.check_seconds += seconds
        self.check_steps += 1

    def record_exit_results(self, results: dict[int, tuple], final_tokens: torch.Tensor) -> None:
        """results: per probe layer, (token, p1, p2, entropy) of each row (DecoderModel.exit_head)."""
        for layer in self.layers:
            token, p1, p2, entropy = results[layer]
            measure = {"max_prob": p1, "margin": p1 - p2, "entropy": entropy}[self.confidence]
            self.values[layer].extend(measure.float().tolist())
            self.agree[layer].extend((token == final_tokens).tolist())
        self.tokens += len(final_tokens)

    def record_output_nats(self, request_ids: list[str], nats: list[float]) -> None:
        """-ln p of each chosen token under the full-depth distribution."""
        for request_id, value in zip(request_ids, nats, strict=True):
            self.output_nats.setdefault(request_id, []).append(value)

    def record_outputs(self, request_ids: list[str], log_probs: torch.Tensor, tokens: list[int]) -> None:
        """-ln p of each chosen token under the full-depth distribution (log_probs: [rows, vocab])."""
        chosen = log_probs.gather(1, torch.tensor(tokens, device=log_probs.device)[:, None])[:, 0].tolist()
        self.record_output_nats(request_ids, [-value for value in chosen])

    def record_prompt(self, model: DecoderModel, request_id: str, hidden: torch.Tensor, prompt_ids: list[int]) -> None:
        """-ln p of prompt tokens 1..n-1 given positions 0..n-2 (hidden: those positions' last-layer states)."""
        targets = torch.tensor(prompt_ids[1:], device=hidden.device)
        self.prompt_nats[request_id] = sum(float(model.token_nats(hidden[start:start + PROMPT_CHUNK],
                                                                  targets[start:start + PROMPT_CHUNK]).sum())
                                           for start in range(0, len(prompt_ids) - 1, PROMPT_CHUNK))
