"""`helios serve`: builds the AsyncLLM and runs the app under uvicorn until SIGINT or SIGTERM, then stops accepting
connections, lets in-flight requests finish (for up to `shutdown_timeout` seconds; what is left is aborted) and
returns 0."""

from __future__ import annotations

import logging
import signal

import uvicorn

from helios.async_llm import AsyncLLM
from helios.server.app import build_app

logger = logging.getLogger("helios")


def serve(models: list[str], *, host: str = "127.0.0.1", port: int = 8000, served_model_names: list[str] | None = None,
          shutdown_timeout: float = 30.0, log_level: str = "info", **llm_kwargs) -> int:
    llm = AsyncLLM(models if len(models) > 1 else models[0], **llm_kwargs)
    if served_model_names is None:  # as the command line spells them; with several, the control plane picks
        served_model_names = [str(models[0])] if len(models) == 1 else ["helios", *map(str, models)]
    app = build_app(llm, served_model_names)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then raises the signal again for the handler it found:
    # this one takes it, so a requested shutdown ends with exit status 0 instead of 130 or a kill by SIGTERM.
    previous = {sig: signal.signal(sig, _shutdown_requested) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        llm.shutdown()
    return 0


def _shutdown_requested(signum: int, frame) -> None:
    logger.info("helios serve: %s handled, exiting", signal.Signals(signum).name)
