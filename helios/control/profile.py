"""A Performance History Table (PHT) row: what one candidate did on the live requests it served at full depth
with every probe exit evaluated (helios.engine.probes.ProbeLog), plus the reference-free quality signal that
compares candidates across tokenizers: bits per byte of the prompt text (and of the output) under the model."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from helios.engine.probes import ProbeLog
from helios.exits.thresholds import ExitStats

MAX_PAIRS = 4096  # (confidence, agree) pairs kept per probe layer, newest first (live calibration's sample)


@dataclass
class Profile:
    model: str
    total_layers: int
    requests: int
    tokens: int
    seconds: float  # wall time of the profiling steps
    seconds_per_layer: float  # one layer over one step's batch
    seconds_per_check: float  # one exit check (norm + LM head + confidence) over one step's batch
    rows_per_step: float  # mean sequences per profiled step
    prompt_bpb: float | None  # bits per byte of the profiled prompts' text under the model
    output_bpb: float | None  # bits per byte of its own outputs
    confidence: str
    pairs: dict[int, dict[str, list]] = field(default_factory=dict)  # layer -> {"values": [...], "agree": [...]}
    time: float = field(default_factory=time.time)
    # bits per byte of the round's reference prompts (the first profile's, the same text for every candidate of a
    # round, so the quality guard compares like with like), and which reference that was
    reference_bpb: float | None = None
    reference: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def layers(self) -> list[int]:
        return sorted(self.pairs)

    def exit_stats(self) -> ExitStats:
        values = {k: torch.tensor(v["values"], dtype=torch.float32) for k, v in self.pairs.items()}
        agree = {k: torch.tensor(v["agree"], dtype=torch.bool) for k, v in self.pairs.items()}
        return ExitStats(self.confidence, values, agree)

    def summary(self) -> dict:
        """The row without its raw pairs: per probe layer the agreement with the last layer and mean confidence."""
        row = {k: v for k, v in asdict(self).items() if k != "pairs"}
        row["tokens_per_second"] = round(self.tokens_per_second, 2)
        row["agreement"] = {k: round(sum(v["agree"]) / max(1, len(v["agree"])), 4)
                            for k, v in sorted(self.pairs.items())}
        return row

    def to_json(self) -> dict:
        data = asdict(self)
        data["pairs"] = {str(k): v for k, v in self.pairs.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> Profile:
        data = dict(data)
        data["pairs"] = {int(k): v for k, v in data.get("pairs", {}).items()}
        return cls(**data)


def bits_per_byte(nats: float, num_bytes: int) -> float | None:
    return nats / math.log(2) / num_bytes if num_bytes > 0 else None


def build_profile(model: str, total_layers: int, log: ProbeLog, seconds: float, prompt_bytes: dict[str, int],
                  output_bytes: dict[str, int], requests: int) -> Profile:
    """prompt_bytes / output_bytes: per profiled request id, the UTF-8 bytes of the text whose tokens were scored
    (prompt tokens 1..n-1, and the generated text)."""
    scored = [rid for rid in log.prompt_nats if rid in prompt_bytes]
    prompt_bpb = bits_per_byte(sum(log.prompt_nats[r] for r in scored), sum(prompt_bytes[r] for r in scored))
    produced = [rid for rid in log.output_nats if rid in output_bytes]
    output_bpb = bits_per_byte(sum(sum(log.output_nats[r]) for r in produced), sum(output_bytes[r] for r in produced))
    pairs = {layer: {"values": [round(v, 5) for v in log.values[layer][-MAX_PAIRS:]],
                     "agree": [bool(a) for a in log.agree[layer][-MAX_PAIRS:]]} for layer in log.layers}
    return Profile(model=model, total_layers=total_layers, requests=requests, tokens=log.tokens,
                   seconds=round(seconds, 4), seconds_per_layer=log.seconds_per_layer,
                   seconds_per_check=log.seconds_per_check,
                   rows_per_step=log.tokens / max(1, log.layer_steps // max(1, total_layers)),
                   prompt_bpb=prompt_bpb, output_bpb=output_bpb,
                   confidence=log.confidence, pairs=pairs)


AUTO_SPREAD = 8  # probe layers of a model without trained exit heads (SLO.probe_layers="auto")


def probe_layers(total: int, count: int | str, extra: list[int] | tuple[int, ...] = ()) -> tuple[int, ...]:
    """`count` layers spread evenly over 1..total-1, plus any layers with trained exit heads (`extra`).
    count="auto": only the head layers when there are any, else AUTO_SPREAD spread layers."""
    if count == "auto":
        count = 0 if any(1 <= x < total for x in extra) else AUTO_SPREAD
    grid = {max(1, round(total * k / (count + 1))) for k in range(1, count + 1)}
    return tuple(sorted(x for x in grid | set(extra) if 1 <= x < total))
