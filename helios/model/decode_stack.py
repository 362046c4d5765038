"""The fused decode stack: a Llama-family model's layers in one helios._C call (one OpenMP parallel region per step
instead of ~5 per layer; csrc/cpu/decode_stack.cpp says why that matters with sleeping OpenMP threads). float32
activations, with float32, int8 or int4 weights.

The per-layer Python path (LlamaModel.layer) stays the oracle and serves everything the stack does not: prefills,
mixed steps, more than 48 tokens, 16-bit dtypes, early exits and probes.
"""

from __future__ import annotations

import os

import torch

from helios.ops import AttentionMetadata
from helios.ops.quant import WEIGHT_FORMAT

MAX_TOKENS = 48  # csrc/cpu/gemm.h kSmallM


WEIGHT_BITS = {None: 32, **{q: 8 if f == "int8" else 4 for q, f in WEIGHT_FORMAT.items()}}
QUANT_GROUP = 32  # helios.ops.quant.GROUP: a quantized stack multiplies unpadded activations


def stack_supported(config, device: torch.device, dtype: torch.dtype, quantization: str | None,
                    q_out: int) -> bool:
    """Whether a Llama-family model with this config can decode through the stack (HELIOS_DECODE_STACK=0: never).
    q_out = heads x head_dim, the output projection's input features."""
    if os.environ.get("HELIOS_DECODE_STACK", "1") == "0":
        return False
    if device.type != "cpu" or dtype != torch.float32 or quantization not in WEIGHT_BITS:
        return False
    if config.hidden_act != "silu" or config.intermediate_size % 4:
        return False
    features = (config.hidden_size, config.intermediate_size, q_out)
    if quantization is not None and any(k % QUANT_GROUP for k in features):
        return False
    from helios._ext import extension_available

    return extension_available()


def is_decode_step(meta: AttentionMetadata, tokens: int) -> bool:
    """One new token per sequence, every sequence through the paged kernel (the runner's decode-only steps)."""
    if meta.num_paged_seqs is None or meta.dense or not 0 < tokens <= MAX_TOKENS:
        return False
    return meta.num_paged_seqs == tokens and meta.num_paged_tokens == tokens


class StackArgs:
    """The stack call's per-model arguments: built once per (layer list, depth, KV caches), not every step."""

    def __init__(self, layers: list, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers, self.depth, self.kv_caches = layers, len(layers), kv_caches
        linears = [[w.qkv, w.o_proj, w.gate_up, w.down] for w in layers]
        kinds = {_weight_kind(linear) for group in linears for linear in group}
        # one weight kind for the whole stack (a layer replaced after loading may differ: then the per-layer path)
        self.usable = len(kinds) == 1 and None not in kinds
        self.weight_bits, self.round_activations = kinds.pop() if self.usable else (0, False)
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor | None] = []
        if self.usable:
            for w, group in zip(layers, linears, strict=True):
                self.weights += [w.input_norm, w.post_norm]
                for linear in group:
                    self.weights += [linear.weight] if self.weight_bits == 32 else list(linear.parts)
                self.biases += [linear.bias for linear in group]
        self.windows = [w.sliding_window for w in layers]
        self.keys = [kv[0] for kv in kv_caches[:self.depth]]
        self.values = [kv[1] for kv in kv_caches[:self.depth]]

    def matches(self, layers: list, kv_caches: list) -> bool:
        return self.layers is layers and self.depth == len(layers) and self.kv_caches is kv_caches


def _weight_kind(linear) -> tuple[int, bool] | None:
    """(weight bits, activations rounded): 32 for a plain float32 Linear, 8 / 4 for a QuantizedLinear (rounding
    for w8a8 / w4a8); None for what the stack cannot read."""
    if getattr(linear, "plain", False):
        return 32, False
    bits = WEIGHT_BITS.get(getattr(linear, "quantization", None))
    return None if bits in (None, 32) else (bits, linear.round_activations)


def stack_args(model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> StackArgs | None:
    """The model's cached stack arguments (a copy made by DecoderModel.shared has its own layer list, so it builds
    its own); None when some layer cannot run in the stack."""
    args = model.__dict__.get("_stack_args")
    if args is None or not args.matches(model.layers, kv_caches):
        args = model._stack_args = StackArgs(model.layers, kv_caches)
    return args if args.usable else None


def decode_layers(model, args: StackArgs, hidden: torch.Tensor, positions: torch.Tensor,
                  meta: AttentionMetadata) -> torch.Tensor:
    """All of model's loaded layers for a decode step (is_decode_step), in one call."""
    return torch.ops.helios.decode_layers(
        hidden, positions, args.weights, args.biases, args.keys, args.values, meta.slot_mapping, meta.block_tables,
        meta.seq_lens, model.rotary.cos, model.rotary.sin, model.num_heads, model.num_kv_heads, model.eps,
        model.scale, args.windows, args.weight_bits, args.round_activations)
