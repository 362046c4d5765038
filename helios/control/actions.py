"""What the breach monitor's trip may lead to, priced: growing the active model to its next probed layer, or
switching to another candidate at its planned depth. Cost of each over the next `slo.horizon_tokens` tokens =
measured load seconds per layer x layers to load + re-prefill of the in-flight tokens + the tokens' estimated
serving time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from helios.control.profile import Profile
from helios.control.repository import ModelRepository
from helios.control.selector import Plan, estimate_seconds, live_threshold, never_breach
from helios.control.slo import SLO


@dataclass
class Option:
    cost: float  # seconds over the horizon
    action: str  # "grow" or "switch"
    plan: Plan
    numbers: dict


def breach_options(active: Plan, repository: ModelRepository, plans: list[Plan], inflight_tokens: int,
                   slo: SLO) -> list[Option]:
    options = []
    candidate = repository.candidates[active.model]
    profile = candidate.latest
    if active.depth < profile.total_layers:
        depth = ([x for x in profile.layers if x > active.depth] + [profile.total_layers])[0]
        plan = dataclasses.replace(active, depth=depth, exits=(), thresholds=dict(active.thresholds))
        plan.thresholds[depth] = threshold_at(profile, depth, slo)
        load = (depth - active.depth) * (candidate.facts.load_seconds_per_layer or 0.0)
        per_token = estimate_seconds(profile, depth, (), {})
        cost = load + reprefill_seconds(profile, inflight_tokens, depth) + slo.horizon_tokens * per_token
        options.append(Option(cost, "grow", plan, {"load_s": round(load, 3), "per_token_s": per_token}))
    for plan in plans:
        if plan.model == active.model:
            continue
        other = repository.candidates[plan.model]
        load = plan.depth * (other.facts.load_seconds_per_layer or 0.0)
        cost = load + reprefill_seconds(other.latest, inflight_tokens, plan.depth) \
            + slo.horizon_tokens * plan.seconds_per_token
        options.append(Option(cost, "switch", plan, {"load_s": round(load, 3), "per_token_s": plan.seconds_per_token}))
    return options


def threshold_at(profile: Profile, layer: int, slo: SLO) -> float:
    """The live threshold at a deeper layer; at the last layer, or where no threshold reaches the target, one that
    every token passes (the next breaches would only trigger the same action again)."""
    if layer >= profile.total_layers or layer not in profile.pairs:
        return never_breach(profile.confidence)
    value = live_threshold(profile.exit_stats(), layer, slo.target_precision, slo.min_exits)
    return never_breach(profile.confidence) if value is None else value


def reprefill_seconds(profile: Profile, tokens: int, depth: int) -> float:
    """Re-prefilling `tokens` through `depth` layers, each token priced as one decode row of the profiled batch
    (an upper bound: prefill rows share each weight read)."""
    return tokens * depth * profile.seconds_per_layer / max(1.0, profile.rows_per_step)
