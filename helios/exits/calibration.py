"""Exit calibration: per-exit thresholds such that tokens leaving at an exit agree with the final layer at a
target precision, measured on held-out text.

Exits are calibrated in order, the way the runtime applies them: exit k's threshold is chosen among the tokens
that did not leave at an earlier exit. At each exit the threshold is the lowest confidence whose set
{tokens at least that confident} still has precision ≥ target (so the exit rate is as high as the target
allows); an exit where no such set of at least `min_exits` tokens exists is switched off (threshold None).
Confidences come from the runtime's own exit head (`DecoderModel.exit_head`), so what is calibrated is
exactly what is served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from helios.exits.config import CONFIDENCE_MEASURES
from helios.exits.corpus import token_windows
from helios.exits.heads import ExitHeads
from helios.exits.tuning import forward_groups, teacher_forcing_llm


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


@torch.inference_mode()
def collect_exit_stats(engine, windows: list[list[int]], layers: list[int], confidence: str = "max_prob",
                       batch_tokens: int = 1024, progress: bool = False) -> ExitStats:
    """Runs the full model over `windows` and records each exit's confidence and agreement with the final
    layer, through whatever exit heads the engine's model carries."""
    if confidence not in CONFIDENCE_MEASURES:
        raise ValueError(f"confidence must be one of {CONFIDENCE_MEASURES}, got {confidence!r}")
    model = engine.model
    final = model.total_layers
    values: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    agree: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    bar = tqdm(total=sum(len(w) for w in windows), unit="tok", desc="scoring exits", disable=not progress)
    with bar:
        for group in forward_groups(engine, windows, batch_tokens):
            states = engine.hidden_states(group, sorted(set(layers)) + [final])
            final_tokens = model.exit_head(states[final])[0]
            for layer in layers:
                token, p1, p2, entropy = model.exit_head(states[layer], layer)
                measure = {"max_prob": p1, "margin": p1 - p2, "entropy": entropy}[confidence]
                values[layer].append(measure.float().cpu())
                agree[layer].append((token == final_tokens).cpu())
            bar.update(sum(len(w) for w in group))
    return ExitStats(confidence, {k: torch.cat(v) for k, v in values.items()},
                     {k: torch.cat(v) for k, v in agree.items()})


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


def calibrate_exits(model, heads: str | Path, corpus: list[str | Path], target_precision: float = 0.95, *,
                    confidence: str = "max_prob", max_tokens: int = 50_000, seq_len: int = 256,
                    batch_tokens: int = 1024, min_exits: int = 50, seed: int = 0, write: bool = True,
                    progress: bool = True) -> dict:
    """Calibrates the exit heads in directory `heads` for `model` (alias, path or LLM) on held-out `corpus`
    text; writes the thresholds into the heads' manifest (unless write=False) and returns the report."""
    started = time.perf_counter()
    llm = teacher_forcing_llm(model, max(batch_tokens, seq_len))
    engine, m = llm.engine, llm.engine.model
    exit_heads = ExitHeads.load(heads, dtype=engine.dtype, device=engine.device)
    exit_heads.check_model(m, heads)
    if m.loaded_layers != m.total_layers:
        raise ValueError("calibration needs the whole model loaded (exits are compared with the final layer)")
    windows = token_windows(engine.tokenizer, corpus, max_tokens, min(seq_len, engine.max_model_len), seed)
    previous, m.exit_heads = m.exit_heads, exit_heads
    try:
        stats = collect_exit_stats(engine, windows, exit_heads.layers, confidence, batch_tokens, progress)
    finally:
        m.exit_heads = previous
    thresholds = choose_thresholds(stats, target_precision, min_exits)
    report = {"target_precision": target_precision, "confidence": confidence, "min_exits": min_exits,
              "corpus": [str(p) for p in corpus], **exit_report(stats, thresholds),
              "seconds": round(time.perf_counter() - started, 1)}
    if write:
        exit_heads.thresholds = thresholds
        exit_heads.confidence = confidence
        exit_heads.info["calibration"] = {**report, "per_exit": {str(k): v for k, v in report["per_exit"].items()}}
        exit_heads.save(heads)
    return report
