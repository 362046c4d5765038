"""model_type → architecture class, and the one place that builds a model from a checkpoint."""

from __future__ import annotations

import torch

from helios.model.base import DecoderModel
from helios.model.checkpoint import Checkpoint
from helios.model.gemma3 import Gemma3Model
from helios.model.layers import WeightReader
from helios.model.llama import LlamaModel
from helios.model.opt import OPTModel
from helios.ops import PagedAttentionOps

# model_type -> (class, tensor-name prefixes tried in order)
ARCHITECTURES: dict[str, tuple[type[DecoderModel], tuple[str, ...]]] = {
    "llama": (LlamaModel, ("model.", "")),
    "mistral": (LlamaModel, ("model.", "")),
    "qwen2": (LlamaModel, ("model.", "")),
    "opt": (OPTModel, ("model.decoder.", "decoder.", "")),
    "gemma3_text": (Gemma3Model, ("model.", "")),
}
SUPPORTED = sorted(ARCHITECTURES)


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3":
        raise ValueError("this is a multimodal Gemma 3 checkpoint (model_type 'gemma3'); helios serves the text "
                         "decoder alone: use a gemma3_text checkpoint (Gemma3ForCausalLM), e.g. Gemma 3 270M/1B")
    if model_type not in ARCHITECTURES:
        archs = getattr(config, "architectures", None) or []
        raise ValueError(f"unsupported architecture {model_type!r} {archs}; helios supports: {', '.join(SUPPORTED)}")


def weight_reader(config, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device,
                  quantization: str | None = None) -> WeightReader:
    """A reader of this architecture's tensors (its name prefixes) in the serving dtype and device."""
    check_supported(config)
    return WeightReader(checkpoint, dtype, device, ARCHITECTURES[config.model_type][1], quantization)


def load_model(config, checkpoint: Checkpoint, num_layers: int, max_positions: int, dtype: torch.dtype,
               device: torch.device, ops: PagedAttentionOps, quantization: str | None = None) -> DecoderModel:
    cls = ARCHITECTURES[config.model_type][0] if config.model_type in ARCHITECTURES else None
    reader = weight_reader(config, checkpoint, dtype, device, quantization)
    return cls(config, reader, num_layers, max_positions, ops)
