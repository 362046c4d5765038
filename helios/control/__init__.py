"""The HELIOS control plane: profiles candidate models on live traffic, picks a model and a depth for the SLO,
loads only those layers, watches confidence breaches, grows the depth or switches models, re-profiles.
It drives engines (helios.engine); nothing below imports it."""

from helios.control.controller import ControlledEngine
from helios.control.slo import SLO

__all__ = ["SLO", "ControlledEngine"]
