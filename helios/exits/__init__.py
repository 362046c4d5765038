"""Early exits: configuration, and the forward pass in which tokens leave the layer stack."""

from helios.exits.config import ExitConfig

__all__ = ["ExitConfig"]
