"""ExitConfig: where tokens may leave the layer stack and how confident they must be."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy")
# "auto": sparse exits at these fractions of the loaded depth. One check reads the whole LM head (for SmolLM2
# about 8 layers' weights; ~4 layers' time with oneDNN at batch 16, see README), so checking every layer costs
# more than it can save; intermediate layers of untuned models agree with the last one mostly late in the stack.
AUTO_EXIT_FRACTIONS = (0.5, 0.67, 0.83)


@dataclass
class ExitConfig:
    """layers: "auto" (sparse default), "all", or 1-based layer numbers; the last loaded layer is always an exit.
    confidence: "max_prob" (p1 >= threshold), "margin" (p1 - p2 >= threshold) or "entropy" (entropy <= threshold,
    in nats). A token forced out at the last loaded layer below the threshold is a confidence breach."""

    layers: str | list[int] = "auto"
    confidence: str = "max_prob"
    threshold: float | None = None  # None: the heads' calibrated per-exit thresholds, else DEFAULT_THRESHOLD
    heads: str | Path | None = None  # exit adapters (None: the model's helios_exits/ folder if it has one)

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            if self.layers not in {"auto", "all"}:
                raise ValueError(f"ExitConfig.layers must be 'auto', 'all' or a list of layer numbers, got "
                                 f"{self.layers!r}")
        elif isinstance(self.layers, (list, tuple)):
            if not self.layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers):
                raise TypeError("ExitConfig.layers must be a non-empty list of ints (1-based layer numbers)")
            if min(self.layers) < 1:
                raise ValueError(f"ExitConfig.layers are 1-based: got {min(self.layers)}")
            self.layers = sorted(set(self.layers))
        else:
            raise TypeError(f"ExitConfig.layers must be a string or a list of ints, got {type(self.layers).__name__}")
        if self.confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"ExitConfig.confidence must be one of {CONFIDENCE_MEASURES}, got {self.confidence!r}")
        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
                raise TypeError(f"ExitConfig.threshold must be a number, got {type(self.threshold).__name__}")
            if math.isnan(self.threshold):
                raise ValueError("ExitConfig.threshold must not be NaN")
            if self.confidence == "entropy" and self.threshold < 0:
                raise ValueError(f"ExitConfig.threshold is an entropy bound here and must be >= 0, "
                                 f"got {self.threshold}")
        if self.heads is not None and not isinstance(self.heads, (str, Path)):
            raise TypeError(f"ExitConfig.heads must be a directory path, got {type(self.heads).__name__}")

    def exit_layers(self, loaded_layers: int, head_layers: list[int] | None = None) -> tuple[int, ...]:
        """The 1-based exit layers for a model with `loaded_layers` layers loaded (the last one included).
        With trained heads, "auto" means the layers the heads were trained for."""
        if self.layers == "auto" and head_layers:
            chosen = head_layers
        elif self.layers == "all":
            chosen = range(1, loaded_layers)
        elif self.layers == "auto":
            chosen = {max(1, round(loaded_layers * f)) for f in AUTO_EXIT_FRACTIONS}
        else:
            beyond = [x for x in self.layers if x > loaded_layers]
            if beyond:
                raise ValueError(f"ExitConfig.layers {beyond} are deeper than the {loaded_layers} loaded layers")
            chosen = self.layers
        return tuple(sorted({x for x in chosen if x < loaded_layers} | {loaded_layers}))

    def policy(self, loaded_layers: int, heads=None) -> ExitPolicy:
        """Exit layers and the threshold at each, given the loaded depth and any trained heads. With calibrated
        heads and no explicit threshold, exits that calibration switched off (no threshold reaches the target
        precision there) are not checked at all: a check costs several layers' time."""
        layers = self.exit_layers(loaded_layers, heads.layers if heads is not None else None)
        calibrated = {}
        if self.threshold is None and heads is not None and heads.thresholds:
            if heads.confidence not in (None, self.confidence):
                raise ValueError(f"the exit heads were calibrated for confidence={heads.confidence!r}, not "
                                 f"{self.confidence!r}: pass an explicit ExitConfig.threshold or recalibrate")
            calibrated = heads.thresholds
            layers = tuple(x for x in layers if x == loaded_layers or not (x in calibrated and calibrated[x] is None))
        default = DEFAULT_THRESHOLD if self.threshold is None else float(self.threshold)
        thresholds = {x: default if calibrated.get(x) is None else calibrated[x] for x in layers}
        return ExitPolicy(self.confidence, layers, thresholds)


DEFAULT_THRESHOLD = 0.9


@dataclass
class ExitPolicy:
    """What the runtime applies: the exit layers and each one's threshold on the confidence measure."""

    confidence: str
    layers: tuple[int, ...]
    thresholds: dict[int, float]

    def measure(self, p1: torch.Tensor, p2: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        if self.confidence == "max_prob":
            return p1
        if self.confidence == "margin":
            return p1 - p2
        return entropy

    def passes(self, layer: int, p1: torch.Tensor, p2: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """Boolean tensor: which rows are confident enough to exit at `layer`."""
        value, threshold = self.measure(p1, p2, entropy), self.thresholds[layer]
        return value <= threshold if self.confidence == "entropy" else value >= threshold
