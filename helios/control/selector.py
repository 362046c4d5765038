"""Selection from the PHT: live calibration, depth by coverage, intermediate exits by their measured cost, and the
SLO's choice among the candidates that pass the quality guard.

Rules (all on the profiled tokens of the candidate's latest PHT row):
- live threshold at a layer = the lowest confidence at which the tokens at least that confident agree with the
  last layer with the SLO's target precision (helios.exits.thresholds, the offline calibration's own rule);
- depth L = the smallest probed layer where a `coverage` share of all profiled tokens passes its live threshold
  (none does: the whole model, where no token can breach);
- an intermediate exit l < L is kept iff its exit rate x (L - l) x seconds per layer exceeds the share of tokens
  still there x seconds per exit check (both measured while profiling);
- eligible candidates: prompt bits per byte within bpb_tolerance (relative) of the best, measured on the round's
  reference prompts (the first profile's, scored by every candidate); then the objective picks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from helios.control.profile import Profile
from helios.control.repository import ModelFacts
from helios.control.slo import SLO
from helios.exits.thresholds import ExitStats, choose_thresholds


@dataclass
class Plan:
    model: str
    depth: int
    exits: tuple[int, ...]  # intermediate exits kept, below depth
    thresholds: dict[int, float]  # for every exit and the depth
    coverage: float  # share of profiled tokens confident at the depth's threshold
    seconds_per_token: float  # estimated step time share of one token at this depth (profiled batch)
    tokens_per_second: float  # estimated from the profile's measured rate scaled by the cost model
    max_seqs: int | None  # concurrent sequences of max_model_len that fit the memory budget (None: no budget)
    prompt_bpb: float | None  # on the round's reference prompts when measured there (bpb_reference), else its own
    reason: str = ""
    bpb_reference: str | None = None
    scores: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"model": self.model, "depth": self.depth, "exits": list(self.exits),
                "thresholds": {k: round(v, 4) for k, v in self.thresholds.items()}, "coverage": round(self.coverage, 4),
                "tokens_per_second": round(self.tokens_per_second, 2), "max_seqs": self.max_seqs,
                "prompt_bpb": None if self.prompt_bpb is None else round(self.prompt_bpb, 4)}


def never_breach(confidence: str) -> float:
    """A threshold every token passes."""
    return float("inf") if confidence == "entropy" else 0.0


def interim_plan(model: str, depth: int, confidence: str, tokens_per_second: float = 0.0,
                 prompt_bpb: float | None = None) -> Plan:
    """Full depth, no exits, a threshold every token passes: plain decoding while the candidates are profiled."""
    return Plan(model=model, depth=depth, exits=(), thresholds={depth: never_breach(confidence)}, coverage=1.0,
                seconds_per_token=0.0, tokens_per_second=tokens_per_second, max_seqs=None, prompt_bpb=prompt_bpb,
                reason="interim")


def _signed(stats: ExitStats, threshold: float) -> float:
    return -threshold if stats.confidence == "entropy" else threshold


def live_threshold(stats: ExitStats, layer: int, target: float, min_exits: int) -> float | None:
    """Threshold at one layer, calibrated on every profiled token (as if it were the only exit)."""
    single = ExitStats(stats.confidence, {layer: stats.values[layer]}, {layer: stats.agree[layer]})
    return choose_thresholds(single, target, min_exits)[layer]


def coverage_at(stats: ExitStats, layer: int, threshold: float | None) -> float:
    if threshold is None or stats.num_tokens == 0:
        return 0.0
    return float((stats.score(layer) >= _signed(stats, threshold)).float().mean())


def choose_depth(profile: Profile, slo: SLO) -> tuple[int, float | None, float]:
    """(L, its threshold, coverage) by the coverage rule; the whole model when no probed layer qualifies."""
    stats = profile.exit_stats()
    for layer in stats.layers:
        threshold = live_threshold(stats, layer, slo.target_precision, slo.min_exits)
        coverage = coverage_at(stats, layer, threshold)
        if coverage >= slo.coverage:
            return layer, threshold, coverage
    return profile.total_layers, None, 1.0


def choose_exits(profile: Profile, depth: int, slo: SLO) -> tuple[tuple[int, ...], dict[int, float]]:
    """Intermediate exits below `depth` that pay for their checks, with thresholds calibrated in order."""
    stats = profile.exit_stats()
    below = [x for x in stats.layers if x < depth]
    kept: list[int] = []
    thresholds: dict[int, float] = {}
    remaining = torch.ones(stats.num_tokens, dtype=torch.bool)
    for layer in below:
        sub = ExitStats(stats.confidence, {layer: stats.values[layer][remaining]},
                        {layer: stats.agree[layer][remaining]})
        threshold = choose_thresholds(sub, slo.target_precision, slo.min_exits)[layer] if sub.num_tokens else None
        if threshold is None:
            continue
        leaving = remaining & (stats.score(layer) >= _signed(stats, threshold))
        rate, reach = float(leaving.float().mean()), float(remaining.float().mean())
        if rate * (depth - layer) * profile.seconds_per_layer > reach * profile.seconds_per_check:
            kept.append(layer)
            thresholds[layer] = threshold
            remaining &= ~leaving
    return tuple(kept), thresholds


def estimate_seconds(profile: Profile, depth: int, exits: tuple[int, ...], thresholds: dict[int, float]) -> float:
    """Expected time of one token's share of a step: layers run + exit checks made + the last head."""
    stats = profile.exit_stats()
    remaining = torch.ones(max(1, stats.num_tokens), dtype=torch.bool)
    layers, checks = float(depth), 1.0
    for layer in exits:
        if stats.num_tokens == 0:
            break
        checks += float(remaining.float().mean())
        leaving = remaining & (stats.score(layer) >= _signed(stats, thresholds[layer]))
        layers -= float(leaving.float().mean()) * (depth - layer)
        remaining &= ~leaving
    return layers * profile.seconds_per_layer + checks * profile.seconds_per_check


def plan_candidate(profile: Profile, facts: ModelFacts, slo: SLO, memory_budget: int | None,
                   max_model_len: int) -> Plan:
    depth, depth_threshold, coverage = choose_depth(profile, slo)
    exits, thresholds = choose_exits(profile, depth, slo)
    if depth < profile.total_layers:
        # the breach threshold at L, calibrated on the tokens that reach L past the kept exits
        stats = profile.exit_stats()
        remaining = torch.ones(stats.num_tokens, dtype=torch.bool)
        for layer in exits:
            remaining &= ~(stats.score(layer) >= _signed(stats, thresholds[layer]))
        sub = ExitStats(stats.confidence, {depth: stats.values[depth][remaining]},
                        {depth: stats.agree[depth][remaining]})
        at_depth = choose_thresholds(sub, slo.target_precision, slo.min_exits)[depth] if sub.num_tokens else None
        thresholds[depth] = depth_threshold if at_depth is None else at_depth
    else:
        thresholds[depth] = never_breach(profile.confidence)  # the whole model: its own last layer is right
    seconds = estimate_seconds(profile, depth, exits, thresholds)
    full = profile.total_layers * profile.seconds_per_layer + profile.seconds_per_check
    tps = profile.tokens_per_second * full / seconds if seconds > 0 else 0.0
    max_seqs = None
    if memory_budget is not None:
        free = memory_budget - facts.weight_bytes(depth)
        per_seq = facts.kv_bytes_per_token_per_layer * depth * max_model_len
        max_seqs = max(0, int(free // per_seq)) if per_seq else None
    return Plan(model=profile.model, depth=depth, exits=exits, thresholds=thresholds, coverage=coverage,
                seconds_per_token=seconds, tokens_per_second=tps, max_seqs=max_seqs,
                prompt_bpb=profile.prompt_bpb if profile.reference_bpb is None else profile.reference_bpb,
                bpb_reference=None if profile.reference_bpb is None else profile.reference)


def select(plans: list[Plan], slo: SLO) -> Plan:
    """The SLO's best plan among the candidates whose prompt bits per byte pass the quality guard."""
    if not plans:
        raise ValueError("no profiled candidate to select from")
    measured = [p.prompt_bpb for p in plans if p.prompt_bpb is not None]
    best_bpb = min(measured) if measured else None
    eligible = [p for p in plans if best_bpb is None or p.prompt_bpb is None
                or p.prompt_bpb <= best_bpb * (1 + slo.bpb_tolerance)]
    key = {"throughput": lambda p: p.tokens_per_second,
           "latency": lambda p: -p.seconds_per_token,
           "energy": lambda p: -p.seconds_per_token,
           "memory": lambda p: (p.max_seqs or 0, p.tokens_per_second)}[slo.objective]
    chosen = max(eligible, key=key)
    references = {p.bpb_reference for p in plans if p.prompt_bpb is not None}
    text = "the same reference prompts" if len(references) == 1 and None not in references else \
        "each one's own profiled prompts"
    chosen.reason = (f"best {slo.objective} among {[p.model for p in eligible]} (prompt bits/byte within "
                     f"{slo.bpb_tolerance:.0%} of the best, {best_bpb if best_bpb is None else round(best_bpb, 4)}, "
                     f"on {text})")
    chosen.scores = {p.model: p.summary() for p in plans}
    return chosen
