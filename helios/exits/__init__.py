"""Early exits: configuration, the forward pass in which tokens leave the layer stack, and the tuning and
calibration of exit adapters."""

from helios.exits.calibration import calibrate_exits
from helios.exits.config import ExitConfig
from helios.exits.tuning import tune_exits

__all__ = ["ExitConfig", "calibrate_exits", "tune_exits"]
