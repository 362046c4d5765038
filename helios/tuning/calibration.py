"""Exit calibration: per-exit thresholds such that tokens leaving at an exit agree with the final layer at a
target precision, measured on held-out text.

The threshold rule is helios.exits.thresholds (shared with live calibration in helios.control). Confidences
come from the runtime's own exit head (`DecoderModel.exit_head`), so what is calibrated is exactly what is served.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from helios.exits.config import CONFIDENCE_MEASURES
from helios.exits.heads import ExitHeads
from helios.exits.thresholds import ExitStats, choose_thresholds, exit_report
from helios.tuning.corpus import token_windows
from helios.tuning.tune import forward_groups, teacher_forcing_engine


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


def calibrate_exits(model, heads: str | Path, corpus: list[str | Path], target_precision: float = 0.95, *,
                    confidence: str = "max_prob", max_tokens: int = 50_000, seq_len: int = 256,
                    batch_tokens: int = 1024, min_exits: int = 50, seed: int = 0, write: bool = True,
                    progress: bool = True) -> dict:
    """Calibrates the exit heads in directory `heads` for `model` (alias, path or LLM) on held-out `corpus`
    text; writes the thresholds into the heads' manifest (unless write=False) and returns the report."""
    started = time.perf_counter()
    engine = teacher_forcing_engine(model, max(batch_tokens, seq_len))
    m = engine.model
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
