"""helios-serve: a serving runtime for early-exit LLMs (after HELIOS, arXiv 2504.10724)."""

from helios.engine.llm import LLM
from helios.engine.outputs import CompletionOutput, RequestOutput
from helios.exits.config import ExitConfig
from helios.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "ExitConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
