"""Early exits as served: configuration and policy (layers, thresholds), exit adapters and their file format, and
the threshold rule. Training and offline calibration live in helios.tuning."""

from helios.exits.config import ExitConfig

__all__ = ["ExitConfig"]
