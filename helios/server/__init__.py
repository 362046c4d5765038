"""The OpenAI-compatible HTTP server (install with `pip install 'helios-serve[server]'`)."""

from helios.server.app import build_app
from helios.server.launch import serve

__all__ = ["build_app", "serve"]
