"""helios-serve: a serving runtime for early-exit LLMs (after HELIOS, arXiv 2504.10724)."""

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels can only be interpreted, and triton's own library must be decorated in that mode:
    # so the choice is made here, before anything helios imports can load triton (importing torch does not).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helios.engine.llm import LLM  # noqa: E402
from helios.engine.outputs import CompletionOutput, RequestOutput  # noqa: E402
from helios.exits.config import ExitConfig  # noqa: E402
from helios.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "ExitConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
