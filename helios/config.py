"""EngineConfig: every LLM(...) argument, validated up front; each error names its field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from helios.exits.config import ExitConfig
from helios.model.checkpoint import LOAD_FORMATS
from helios.ops.quant import check_quantization
from helios.utils.memory import parse_bytes


def _positive_int(name: str, value, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class EngineConfig:
    model: str | Path
    device: str | torch.device = "auto"
    dtype: str | torch.dtype = "auto"
    memory_budget: int | str | None = None
    block_size: int = 16
    kv_cache_blocks: int | None = None
    max_num_seqs: int = 256
    max_model_len: int | None = None
    num_layers: int | None = None
    max_num_batched_tokens: int | None = None
    seed: int = 0
    enable_prefix_caching: bool = True
    early_exit: ExitConfig | None = None
    load_format: str = "auto"
    quantization: str | None = None  # weight-only "int8" / "int4"; "w8a8" / "w4a8" also round activations (CPU)
    kv_cache_dtype: str | torch.dtype = "auto"  # the model's dtype; float16 / bfloat16 under a float32 model (CPU)
    # vLLM's constructor names, honoured or refused with what helios does instead
    tokenizer: str | Path | None = None
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = False
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, Path)):
            raise TypeError(f"model must be a path or alias string, got {type(self.model).__name__}")
        if self.memory_budget is not None:
            self.memory_budget = parse_bytes(self.memory_budget, "memory_budget")
        _positive_int("block_size", self.block_size)
        _positive_int("kv_cache_blocks", self.kv_cache_blocks, optional=True)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_model_len", self.max_model_len, optional=True)
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (one prompt token + one generated), got {self.max_model_len}")
        if self.num_layers is not None:
            if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int):
                raise TypeError(f"num_layers must be an int, got {type(self.num_layers).__name__}")
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens, optional=True)
        if self.early_exit is not None and not isinstance(self.early_exit, ExitConfig):
            raise TypeError(f"early_exit must be an ExitConfig or None, got {type(self.early_exit).__name__}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise TypeError(f"enable_prefix_caching must be a bool, got {type(self.enable_prefix_caching).__name__}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        check_quantization(self.quantization)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.tokenizer is not None and not isinstance(self.tokenizer, (str, Path)):
            raise TypeError(f"tokenizer must be a directory path, got {type(self.tokenizer).__name__}")
        if self.gpu_memory_utilization is not None:
            value = self.gpu_memory_utilization
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"gpu_memory_utilization must be a number, got {type(value).__name__}")
            if not 0 < value <= 1:
                raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {value}")
            if self.memory_budget is not None:
                raise ValueError("pass memory_budget (bytes) or gpu_memory_utilization (a share of GPU memory), "
                                 "not both")
        for name in ("enforce_eager", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        if self.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size}: helios runs a model on one device "
                             "(tensor parallelism is not supported); use 1")
