"""Offline exit tuning and calibration on text corpora (drives an engine; nothing in serving imports it)."""

from helios.tuning.calibration import calibrate_exits
from helios.tuning.tune import tune_exits

__all__ = ["calibrate_exits", "tune_exits"]
