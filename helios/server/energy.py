"""GPU energy from NVML (nvidia-ml-py, the maintained bindings; its module is named pynvml): the joules a CUDA
device has used since the server started. Without NVML or a CUDA engine there is no meter (None), never an error."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("helios")


class EnergyMeter:
    def __init__(self, nvml, handle):
        self._nvml, self._handle = nvml, handle
        self._start_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)

    def joules(self) -> float:
        """Energy the device used since this meter was made (NVML counts millijoules since the driver loaded)."""
        return (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._start_mj) / 1000.0


def energy_meter(device: str | torch.device) -> EnergyMeter | None:
    """A meter for the engine's device when it is a CUDA GPU that NVML can read; None otherwise."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        return EnergyMeter(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
    except Exception as e:  # no nvidia-ml-py, no driver, or a GPU without an energy counter
        logger.info("no GPU energy metrics: %s", e)
        return None
