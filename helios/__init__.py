"""helios-serve: a serving runtime for early-exit LLMs (after HELIOS, arXiv 2504.10724)."""

import os
import sys

# OpenMP threads that wait for work sleep instead of spinning: on cores shared with other processes, spinning
# threads take the time the working ones need (decoding ran up to 6x slower under a competing load, see the README's
# "CPU threads"); on an idle machine sleeping costs about 10-20%. OpenMP reads this once, when torch loads it, so
# it takes effect only if helios is imported before torch; OMP_WAIT_POLICY=ACTIVE in the environment keeps spinning.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels can only be interpreted, and triton's own library must be decorated in that mode:
    # so the choice is made here, before anything helios imports can load triton (importing torch does not).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helios.async_llm import AsyncLLM  # noqa: E402
from helios.engine.outputs import CompletionOutput, RequestOutput  # noqa: E402
from helios.exits.config import ExitConfig  # noqa: E402
from helios.llm import LLM  # noqa: E402
from helios.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "ExitConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
