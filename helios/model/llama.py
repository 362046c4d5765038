"""Llama family: Llama, SmolLM2, Mistral, Qwen2 (q/k/v bias). RMSNorm, RoPE, gated MLP, GQA.

Packed projections (q|k|v and gate|up) are concatenated at load time: one matmul instead of three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from helios.model.base import DecoderModel
from helios.model.decode_stack import decode_layers, is_decode_step, stack_args, stack_supported
from helios.model.layers import RotaryEmbedding, WeightReader
from helios.ops import AttentionMetadata, PagedAttentionOps
from helios.ops.layer_ops import LayerOps
from helios.ops.linear import Linear
from helios.ops.norm import Norm


@dataclass
class LlamaLayer:
    input_norm: torch.Tensor
    qkv: Linear
    o_proj: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear
    sliding_window: int


def _cat_optional(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(t is None for t in tensors):
        return None
    if any(t is None for t in tensors):
        raise ValueError("checkpoint has biases for only some of the packed projections")
    return torch.cat(tensors)


class LlamaModel(DecoderModel):
    def __init__(self, config, reader: WeightReader, num_layers: int, max_positions: int, ops: PagedAttentionOps):
        super().__init__(ops)
        self.model_type = config.model_type
        self.total_layers = config.num_hidden_layers
        self.loaded_layers = num_layers
        self.hidden_size = d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or d // self.num_heads
        self.vocab_size = config.vocab_size
        self.eps = config.rms_norm_eps
        self.act = ACT2FN[config.hidden_act]
        self.layer_ops = LayerOps(reader.device)
        self.silu = config.hidden_act == "silu"  # the fused gated MLP; other activations go through self.act
        self.scale = self.head_dim**-0.5
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.config = config
        self.attn_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        self.embed_tokens = reader.get("embed_tokens.weight", (self.vocab_size, d))
        # decode steps through the fused stack: its linears keep their weights plain (see helios.ops.linear)
        self.use_stack = stack_supported(config, reader.device, reader.dtype, reader.quantization,
                                         self.num_heads * self.head_dim)
        self.layers: list[LlamaLayer] = self._load_layers(reader, 0, num_layers)
        self.final_norm = Norm("rms", reader.get("norm.weight", (d,)), None, self.eps)
        self._finish_loading(reader, tied=getattr(config, "tie_word_embeddings", False))
        self.rotary = RotaryEmbedding(config, self.head_dim, max_positions, reader.dtype, reader.device)
        self.qkv_split = (q_out, kv_out, kv_out)

    def _load_layer(self, reader: WeightReader, i: int) -> LlamaLayer:
        config, d, p = self.config, self.hidden_size, f"layers.{i}."
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        inter = config.intermediate_size
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None) or -1
        plain = self.use_stack

        def bias(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
            return reader.get(p + name, shape) if self.attn_bias else None

        sliding = layer_types is None and config.model_type == "mistral" or (
            layer_types is not None and layer_types[i] == "sliding_attention")
        return LlamaLayer(
            input_norm=reader.get(p + "input_layernorm.weight", (d,)),
            qkv=reader.linear(torch.cat([reader.get(p + "self_attn.q_proj.weight", (q_out, d)),
                                  reader.get(p + "self_attn.k_proj.weight", (kv_out, d)),
                                  reader.get(p + "self_attn.v_proj.weight", (kv_out, d))]),
                       _cat_optional([bias("self_attn.q_proj.bias", (q_out,)),
                                      bias("self_attn.k_proj.bias", (kv_out,)),
                                      bias("self_attn.v_proj.bias", (kv_out,))]), plain),
            o_proj=reader.linear(reader.get(p + "self_attn.o_proj.weight", (d, q_out)),
                          reader.maybe(p + "self_attn.o_proj.bias", (d,)), plain),
            post_norm=reader.get(p + "post_attention_layernorm.weight", (d,)),
            gate_up=reader.linear(torch.cat([reader.get(p + "mlp.gate_proj.weight", (inter, d)),
                                      reader.get(p + "mlp.up_proj.weight", (inter, d))]),
                           _cat_optional([reader.maybe(p + "mlp.gate_proj.bias", (inter,)),
                                          reader.maybe(p + "mlp.up_proj.bias", (inter,))]), plain),
            down=reader.linear(reader.get(p + "mlp.down_proj.weight", (d, inter)),
                        reader.maybe(p + "mlp.down_proj.bias", (d,)), plain),
            sliding_window=window if sliding else -1,
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        args = stack_args(self, kv_caches) if self.use_stack and is_decode_step(meta, input_ids.shape[0]) else None
        if args is None:
            return super().forward(input_ids, positions, kv_caches, meta)
        return decode_layers(self, args, self.embed(input_ids, positions), positions, meta)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens)

    def _qkv(self, w: LlamaLayer, hidden: torch.Tensor, positions: torch.Tensor):
        tokens = hidden.shape[0]
        q, k, v = w.qkv(self.layer_ops.rms_norm(hidden, w.input_norm, self.eps)).split(self.qkv_split, dim=-1)
        q, k = self.layer_ops.rotary(q.view(tokens, self.num_heads, self.head_dim),
                                     k.view(tokens, self.num_kv_heads, self.head_dim), positions,
                                     self.rotary.cos, self.rotary.sin)
        return q, k, v.view(tokens, self.num_kv_heads, self.head_dim)

    def layer(self, index, hidden, positions, kv, meta: AttentionMetadata):
        w = self.layers[index]
        hidden = w.o_proj.add(self._attend(w, hidden, positions, kv, meta), hidden)
        gate_up = w.gate_up(self.layer_ops.rms_norm(hidden, w.post_norm, self.eps))
        if self.silu:
            return w.down.add(self.layer_ops.silu_and_mul(gate_up), hidden)
        gate, up = gate_up.chunk(2, dim=-1)
        return w.down.add(self.act(gate) * up, hidden)
