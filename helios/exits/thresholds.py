"""Exit thresholds from (confidence, agrees with the final layer) pairs: the rule shared by offline calibration
(helios.tuning) and live calibration on served traffic (helios.control).

Exits are calibrated in order, the way the runtime applies them: exit k's threshold is chosen among the tokens
that did not leave at an earlier exit. At each exit the threshold is the lowest confidence whose set
{tokens at least that confident} still has precision >= target (so the exit rate is as high as the target
allows); an exit where no such set of at least `min_exits` tokens exists is switched off (threshold None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExitStats:
    """Per exit layer and held-out token: the confidence measure and whether the exit's top-1 token equals
    the final layer's."""

    confidence: str
    values: dict[int, torch.Tensor]
    agree: dict[int, torch.Tensor]

    @property
    def layers(self) -> list[int]:
        return sorted(self.values)

    @property
    def num_tokens(self) -> int:
        return len(next(iter(self.values.values())))

    def score(self, layer: int) -> torch.Tensor:
        """Higher = more confident, for every measure."""
        v = self.values[layer]
        return -v if self.confidence == "entropy" else v


def _lowest_passing_score(scores: torch.Tensor, agree: torch.Tensor, target: float, min_exits: int) -> float | None:
    """The lowest score s such that the tokens scoring ≥ s number at least min_exits and have precision ≥ target."""
    if len(scores) == 0:
        return None
    order = torch.argsort(scores, descending=True, stable=True)
    s, hits = scores[order], agree[order].double().cumsum(0)
    count = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # a cut must fall between two different scores, so that {score >= s[k-1]} holds exactly k tokens
    boundary = torch.ones(len(s), dtype=torch.bool)
    boundary[:-1] = s[:-1] > s[1:]
    ok = (hits / count >= target) & (count >= min_exits) & boundary
    where = torch.nonzero(ok).flatten()
    return None if len(where) == 0 else float(s[where[-1]])


def choose_thresholds(stats: ExitStats, target_precision: float, min_exits: int = 50) -> dict[int, float | None]:
    """Per exit threshold (None: the exit cannot reach the target and is switched off), exits in order."""
    if not 0 < target_precision <= 1:
        raise ValueError(f"target precision must be in (0, 1], got {target_precision}")
    remaining = torch.ones(stats.num_tokens, dtype=torch.bool)
    thresholds: dict[int, float | None] = {}
    for layer in stats.layers:
        score, agree = stats.score(layer), stats.agree[layer]
        cut = _lowest_passing_score(score[remaining], agree[remaining], target_precision, min_exits)
        if cut is None:
            thresholds[layer] = None
            continue
        thresholds[layer] = -cut if stats.confidence == "entropy" else cut
        remaining &= ~(score >= cut)
    return thresholds


def exit_report(stats: ExitStats, thresholds: dict[int, float | None]) -> dict:
    """What the thresholds do on `stats`' tokens: per exit, the share of all tokens leaving there and their
    precision (agreement with the final layer); overall, the early-exit rate and the agreement of every token
    (tokens that reach the final layer agree by definition)."""
    remaining = torch.ones(stats.num_tokens, dtype=torch.bool)
    total = stats.num_tokens
    per_exit, exited, wrong = {}, 0, 0
    for layer in stats.layers:
        threshold = thresholds.get(layer)
        if threshold is None:
            per_exit[layer] = {"threshold": None, "exit_rate": 0.0, "precision": None, "exits": 0}
            continue
        cut = -threshold if stats.confidence == "entropy" else threshold
        leaving = remaining & (stats.score(layer) >= cut)
        n = int(leaving.sum())
        hits = int((leaving & stats.agree[layer]).sum())
        per_exit[layer] = {"threshold": round(threshold, 6), "exit_rate": round(n / total, 4),
                           "precision": round(hits / n, 4) if n else None, "exits": n}
        exited += n
        wrong += n - hits
        remaining &= ~leaving
    return {"tokens": total, "per_exit": per_exit, "early_exit_rate": round(exited / total, 4),
            "early_exit_precision": round(1 - wrong / exited, 4) if exited else None,
            "agreement": round(1 - wrong / total, 4)}
