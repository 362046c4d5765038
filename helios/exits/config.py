"""ExitConfig: where tokens may leave the layer stack and how confident they must be."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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
    threshold: float = 0.9
    heads: str | Path | None = None

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
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"ExitConfig.threshold must be a number, got {type(self.threshold).__name__}")
        if math.isnan(self.threshold):
            raise ValueError("ExitConfig.threshold must not be NaN")
        if self.confidence == "entropy" and self.threshold < 0:
            raise ValueError(f"ExitConfig.threshold is an entropy bound here and must be >= 0, got {self.threshold}")
        if self.heads is not None:
            raise ValueError("ExitConfig.heads (trained exit adapters) is not supported yet: leave it None to use "
                             "the model's own norm and LM head at every exit")

    def exit_layers(self, loaded_layers: int) -> tuple[int, ...]:
        """The 1-based exit layers for a model with `loaded_layers` layers loaded (the last one included)."""
        if self.layers == "all":
            chosen = range(1, loaded_layers)
        elif self.layers == "auto":
            chosen = {max(1, round(loaded_layers * f)) for f in AUTO_EXIT_FRACTIONS}
        else:
            beyond = [x for x in self.layers if x > loaded_layers]
            if beyond:
                raise ValueError(f"ExitConfig.layers {beyond} are deeper than the {loaded_layers} loaded layers")
            chosen = self.layers
        return tuple(sorted({x for x in chosen if x < loaded_layers} | {loaded_layers}))

    def passes(self, p1, p2, entropy):
        """Boolean tensor: which rows are confident enough to exit."""
        value = self.measure(p1, p2, entropy)
        return value <= self.threshold if self.confidence == "entropy" else value >= self.threshold

    def measure(self, p1, p2, entropy):
        if self.confidence == "max_prob":
            return p1
        if self.confidence == "margin":
            return p1 - p2
        return entropy
