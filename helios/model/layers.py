"""Building blocks shared by the architectures: rotary embedding and weight loading (norms and linears
live in helios.ops)."""

from __future__ import annotations

import torch

from helios.model.checkpoint import Checkpoint
from helios.ops.layer_ops import rotary_reference
from helios.ops.linear import Linear
from helios.ops.quant import QuantizedLinear, check_quantization


class RotaryEmbedding:
    """cos/sin tables for positions [0, max_positions), indexed by each token's position. layer_type picks one
    entry of a per-layer-type rope_parameters dict (Gemma 3: "sliding_attention" and "full_attention")."""

    def __init__(self, config, head_dim: int, max_positions: int, dtype: torch.dtype, device: torch.device,
                 layer_type: str | None = None):
        params = dict(getattr(config, "rope_parameters", None) or {})
        if layer_type is not None:
            params = dict(params.get(layer_type) or {})
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"rope_type {rope_type!r} is not supported")
            extra = {} if layer_type is None else {"layer_type": layer_type}
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **extra)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scaling).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * scaling).to(device=device, dtype=dtype)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        return rotary_reference(q, k, positions, self.cos, self.sin)


class WeightReader:
    """Reads named tensors of one checkpoint in the serving dtype/device and counts the bytes loaded."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device, prefixes: tuple[str, ...],
                 quantization: str | None = None):
        check_quantization(quantization)
        self.checkpoint = checkpoint
        self.quantization = quantization  # how linear() stores decoder weights
        self.dtype = dtype
        self.device = device
        self.prefixes = prefixes  # e.g. ("model.", "") so that both saved layouts load
        self.bytes_loaded = 0
        self.params_loaded = 0

    def name(self, suffix: str) -> str | None:
        return self.checkpoint.find(*(p + suffix for p in self.prefixes))

    def has(self, suffix: str) -> bool:
        return self.name(suffix) is not None

    def get(self, suffix: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        name = self.name(suffix)
        if name is None:
            raise ValueError(
                f"checkpoint {self.checkpoint.directory} has no tensor {suffix!r} "
                f"(tried prefixes {list(self.prefixes)}): truncated, or not this architecture?"
            )
        tensor = self.checkpoint.get(name, self.dtype, self.device)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}")
        self.count(tensor)
        return tensor

    def count(self, tensor: torch.Tensor) -> None:
        self.bytes_loaded += tensor.numel() * tensor.element_size()
        self.params_loaded += tensor.numel()

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
               plain: bool = False) -> Linear | QuantizedLinear:
        """A decoder linear over weights read by get(): quantized when the model is, its bytes recounted;
        plain=True keeps a float weight in its checkpoint layout (see Linear)."""
        if self.quantization is None:
            return Linear(weight, bias, plain=plain)
        quantized = QuantizedLinear(weight, bias, self.quantization)
        self.bytes_loaded += quantized.nbytes - weight.numel() * weight.element_size()
        return quantized

    def maybe(self, suffix: str, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        return self.get(suffix, shape) if self.has(suffix) else None
