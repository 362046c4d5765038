"""Gemma 3 text decoder (gemma3_text): Gemma's RMSNorm ((1 + w), applied in float32) before and after both the
attention and the MLP, QK-norm, GELU-tanh gated MLP, embeddings scaled by sqrt(hidden), attention scaled by
query_pre_attn_scalar^-0.5, and per-layer attention types: "sliding_attention" layers see only the last
`sliding_window` positions and use the local RoPE, "full_attention" layers see everything with the global RoPE.

Norm weights are stored as (1 + w) in float32, so the model's norms and the fused exit head apply exactly what
transformers does. Packed projections (q|k|v, gate|up) are concatenated at load time. Float32 linears on CPU keep
their weights plain for helios' decode kernel (no oneDNN packing: at gemma3-270m's batch 1 a decode step took
50 ms instead of 61, and loading skips the reorder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from helios.model.base import DecoderModel
from helios.model.layers import RotaryEmbedding, WeightReader
from helios.ops import AttentionMetadata, PagedAttentionOps
from helios.ops.linear import Linear
from helios.ops.norm import Norm, rms_norm_fp32

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class Gemma3Layer:
    input_norm: torch.Tensor  # every norm weight here is (1 + w) in float32
    qkv: Linear
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o_proj: Linear
    post_attention_norm: torch.Tensor
    pre_feedforward_norm: torch.Tensor
    post_feedforward_norm: torch.Tensor
    gate_up: Linear
    down: Linear
    sliding_window: int  # -1: full attention
    rotary: RotaryEmbedding


class Gemma3Model(DecoderModel):
    def __init__(self, config, reader: WeightReader, num_layers: int, max_positions: int, ops: PagedAttentionOps):
        super().__init__(ops)
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
            raise ValueError("Gemma 3 configs with logit soft-capping are not supported (Gemma 3 sets none)")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("bidirectional Gemma 3 (an embedding model) is not a causal LM: not supported")
        self.model_type = config.model_type
        self.total_layers = config.num_hidden_layers
        self.loaded_layers = num_layers
        self.hidden_size = d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.vocab_size = config.vocab_size
        self.eps = config.rms_norm_eps
        self.act = ACT2FN[config.hidden_activation]
        self.scale = config.query_pre_attn_scalar ** -0.5
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.config, self.max_positions = config, max_positions
        self._rotary: dict[str, RotaryEmbedding] = {}  # one table per layer type, built when a layer needs it
        self.embed_tokens = reader.get("embed_tokens.weight", (self.vocab_size, d))
        # transformers multiplies by sqrt(hidden) cast to the weights' dtype (55.4256 becomes 55.5 in bfloat16)
        self.embed_scale = torch.tensor(d**0.5, dtype=reader.dtype, device=reader.device)
        self.layers: list[Gemma3Layer] = self._load_layers(reader, 0, num_layers)
        self.final_norm = Norm("rms_fp32", 1.0 + reader.get("norm.weight", (d,)).float(), None, self.eps)
        self._finish_loading(reader, tied=getattr(config, "tie_word_embeddings", True))
        self.qkv_split = (q_out, kv_out, kv_out)

    def _load_layer(self, reader: WeightReader, i: int) -> Gemma3Layer:
        config, d, p = self.config, self.hidden_size, f"layers.{i}."
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        inter = config.intermediate_size
        layer_type = config.layer_types[i]
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"Gemma 3 layer_types must be among {LAYER_TYPES}, got {layer_type!r} for layer {i}")
        if layer_type not in self._rotary:
            self._rotary[layer_type] = RotaryEmbedding(config, self.head_dim, self.max_positions, reader.dtype,
                                                       reader.device, layer_type=layer_type)

        def norm(name: str, size: int = d) -> torch.Tensor:
            return 1.0 + reader.get(name, (size,)).float()

        return Gemma3Layer(
            input_norm=norm(p + "input_layernorm.weight"),
            qkv=reader.linear(torch.cat([reader.get(p + "self_attn.q_proj.weight", (q_out, d)),
                                  reader.get(p + "self_attn.k_proj.weight", (kv_out, d)),
                                  reader.get(p + "self_attn.v_proj.weight", (kv_out, d))]), plain=True),
            q_norm=norm(p + "self_attn.q_norm.weight", self.head_dim),
            k_norm=norm(p + "self_attn.k_norm.weight", self.head_dim),
            o_proj=reader.linear(reader.get(p + "self_attn.o_proj.weight", (d, q_out)), plain=True),
            post_attention_norm=norm(p + "post_attention_layernorm.weight"),
            pre_feedforward_norm=norm(p + "pre_feedforward_layernorm.weight"),
            post_feedforward_norm=norm(p + "post_feedforward_layernorm.weight"),
            gate_up=reader.linear(torch.cat([reader.get(p + "mlp.gate_proj.weight", (inter, d)),
                                      reader.get(p + "mlp.up_proj.weight", (inter, d))]), plain=True),
            down=reader.linear(reader.get(p + "mlp.down_proj.weight", (d, inter)), plain=True),
            sliding_window=config.sliding_window if layer_type == "sliding_attention" else -1,
            rotary=self._rotary[layer_type],
        )

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens) * self.embed_scale

    def _qkv(self, w: Gemma3Layer, hidden: torch.Tensor, positions: torch.Tensor):
        tokens = hidden.shape[0]
        q, k, v = w.qkv(rms_norm_fp32(hidden, w.input_norm, self.eps)).split(self.qkv_split, dim=-1)
        q = rms_norm_fp32(q.view(tokens, self.num_heads, self.head_dim), w.q_norm, self.eps)
        k = rms_norm_fp32(k.view(tokens, self.num_kv_heads, self.head_dim), w.k_norm, self.eps)
        q, k = w.rotary(q, k, positions)
        return q, k, v.view(tokens, self.num_kv_heads, self.head_dim)

    def layer(self, index, hidden, positions, kv, meta: AttentionMetadata):
        w = self.layers[index]
        attn = self._attend(w, hidden, positions, kv, meta)
        hidden = hidden + rms_norm_fp32(w.o_proj(attn), w.post_attention_norm, self.eps)
        x = rms_norm_fp32(hidden, w.pre_feedforward_norm, self.eps)
        gate, up = w.gate_up(x).chunk(2, dim=-1)
        return hidden + rms_norm_fp32(w.down(self.act(gate) * up), w.post_feedforward_norm, self.eps)
