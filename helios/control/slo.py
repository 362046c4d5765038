"""SLO: what the control plane optimizes, the quality guard it must respect, and its loop's parameters (the
defaults are the HELIOS paper's where it gives one)."""

from __future__ import annotations

from dataclasses import dataclass

OBJECTIVES = ("throughput", "latency", "energy", "memory")


@dataclass
class SLO:
    """objective: "throughput" (most tokens/s), "latency" (shortest time per token), "energy" (least work per
    token: without an energy meter, the same estimate as latency), "memory" (most concurrent sequences at the
    memory budget).

    Quality guard: exits must be right (agree with the model's own last layer) with `target_precision`, and a
    candidate is eligible only if the bits per byte of the profiled prompts under it are within
    `bpb_tolerance` (relative) of the best candidate's. Depth L = the smallest profiled exit layer at which a
    `coverage` share of profiled tokens is confident at that precision."""

    objective: str = "throughput"
    target_precision: float = 0.9
    bpb_tolerance: float = 0.1
    coverage: float = 0.9
    profile_requests: int = 5  # live requests each candidate serves at full depth per profile (paper: 5)
    reprofile_interval: int = 150  # RI: requests between a round's selection and the next round (paper: 150)
    breach_window: int = 100  # tokens in the breach monitor's sliding window (paper: 100)
    max_breaches: int = 50  # CBCmax: more breaches than this in the window trigger growth or a switch (paper: 50)
    # exit layers evaluated while profiling: "auto" = the layers with trained exit heads when the model has them
    # (untuned layers are confidently wrong, and each check costs several layers), else 8 spread evenly below the
    # last layer; an int N = N spread layers plus any layers with heads
    probe_layers: int | str = "auto"
    min_exits: int = 20  # profiled tokens a threshold must rest on
    horizon_tokens: int = 1000  # tokens over which growing and switching are compared (load + re-prefill + serving)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"SLO.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("target_precision", "coverage"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"SLO.{name} must be a number in (0, 1], got {value!r}")
        if isinstance(self.bpb_tolerance, bool) or not isinstance(self.bpb_tolerance, (int, float)) \
                or self.bpb_tolerance < 0:
            raise ValueError(f"SLO.bpb_tolerance must be a number >= 0, got {self.bpb_tolerance!r}")
        if self.probe_layers != "auto" and (isinstance(self.probe_layers, bool)
                                             or not isinstance(self.probe_layers, int) or self.probe_layers < 1):
            raise ValueError(f"SLO.probe_layers must be 'auto' or an int >= 1, got {self.probe_layers!r}")
        for name in ("profile_requests", "reprofile_interval", "breach_window", "min_exits", "horizon_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SLO.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.max_breaches, bool) or not isinstance(self.max_breaches, int) \
                or not 0 <= self.max_breaches < self.breach_window:
            raise ValueError(f"SLO.max_breaches must be an int in [0, breach_window), got {self.max_breaches!r}")

    @classmethod
    def parse(cls, value: SLO | str | dict) -> SLO:
        """An SLO, an objective name, or a dict of SLO fields."""
        if isinstance(value, SLO):
            return value
        if isinstance(value, str):
            return cls(objective=value)
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"slo must be an SLO, an objective name or a dict, got {type(value).__name__}")
