"""The fused decode stack: a Llama-family float32 model's layers in one helios._C call (one OpenMP parallel region
per step instead of ~5 per layer; csrc/cpu/decode_stack.cpp says why that matters with sleeping OpenMP threads).

The per-layer Python path (LlamaModel.layer) stays the oracle and serves everything the stack does not: prefills,
mixed steps, more than 48 tokens, other dtypes, quantized weights, early exits and probes.
"""

from __future__ import annotations

import os

import torch

from helios.ops import AttentionMetadata

MAX_TOKENS = 48  # csrc/cpu/gemm.h kSmallM


def stack_supported(config, device: torch.device, dtype: torch.dtype, quantization: str | None) -> bool:
    """Whether a Llama-family model with this config can decode through the stack (HELIOS_DECODE_STACK=0: never)."""
    if os.environ.get("HELIOS_DECODE_STACK", "1") == "0":
        return False
    if device.type != "cpu" or dtype != torch.float32 or quantization is not None:
        return False
    if config.hidden_act != "silu" or config.intermediate_size % 4:
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
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor | None] = []
        for w in layers:
            self.weights += [w.input_norm, w.qkv.weight, w.o_proj.weight, w.post_norm, w.gate_up.weight, w.down.weight]
            self.biases += [w.qkv.bias, w.o_proj.bias, w.gate_up.bias, w.down.bias]
        self.windows = [w.sliding_window for w in layers]
        # every linear must hold its plain float32 weight (a layer replaced after loading may not)
        self.usable = all(getattr(getattr(w, name), "plain", False)
                          for w in layers for name in ("qkv", "o_proj", "gate_up", "down"))
        self.keys = [kv[0] for kv in kv_caches[:self.depth]]
        self.values = [kv[1] for kv in kv_caches[:self.depth]]

    def matches(self, layers: list, kv_caches: list) -> bool:
        return self.layers is layers and self.depth == len(layers) and self.kv_caches is kv_caches


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
        model.scale, args.windows)
