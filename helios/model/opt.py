"""OPT (the HELIOS paper's models): learned positions (offset 2), LayerNorm, ReLU MLP, biases everywhere.

Covers do_layer_norm_before=False (OPT-350m: post-norm, no final norm) and word_embed_proj_dim !=
hidden_size (project_in / project_out around the decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from helios.model.base import DecoderModel
from helios.model.layers import WeightReader
from helios.ops import AttentionMetadata, PagedAttentionOps
from helios.ops.linear import Linear
from helios.ops.norm import Norm

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


@dataclass
class OPTLayer:
    attn_norm: Norm
    qkv: Linear
    out_proj: Linear
    mlp_norm: Norm
    fc1: Linear
    fc2: Linear


class OPTModel(DecoderModel):
    def __init__(self, config, reader: WeightReader, num_layers: int, max_positions: int, ops: PagedAttentionOps):
        super().__init__(ops)
        self.model_type = "opt"
        self.total_layers = config.num_hidden_layers
        self.loaded_layers = num_layers
        self.hidden_size = d = config.hidden_size
        self.num_heads = self.num_kv_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.vocab_size = config.vocab_size
        self.scale = self.head_dim**-0.5
        self.pre_norm = config.do_layer_norm_before
        self.act = ACT2FN[config.activation_function]
        proj_dim = config.word_embed_proj_dim
        self.config = config
        self.affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.linear_bias = getattr(config, "enable_bias", True)
        self.embed_tokens = reader.get("embed_tokens.weight", (self.vocab_size, proj_dim))
        self.embed_positions = reader.get("embed_positions.weight")
        if max_positions > self.embed_positions.shape[0] - POSITION_OFFSET:
            raise ValueError(f"max_model_len={max_positions} exceeds OPT's learned positions "
                             f"({self.embed_positions.shape[0] - POSITION_OFFSET})")
        self.project_in = reader.get("project_in.weight", (d, proj_dim)) if proj_dim != d else None
        self.project_out = reader.get("project_out.weight", (proj_dim, d)) if proj_dim != d else None
        self.layers: list[OPTLayer] = self._load_layers(reader, 0, num_layers)
        has_final = self.pre_norm and not getattr(config, "_remove_final_layer_norm", False)
        self.final_norm = self._norm(reader, "final_layer_norm") if has_final else None
        self._finish_loading(reader, tied=getattr(config, "tie_word_embeddings", True))

    def _norm(self, reader: WeightReader, prefix: str) -> Norm:
        d = self.hidden_size
        weight = reader.get(prefix + ".weight", (d,)) if self.affine else None
        return Norm("layer", weight, reader.get(prefix + ".bias", (d,)) if self.affine else None, 1e-5)

    def _load_layer(self, reader: WeightReader, i: int) -> OPTLayer:
        d, ffn, p = self.hidden_size, self.config.ffn_dim, f"layers.{i}."

        def b(name: str, shape) -> torch.Tensor | None:
            return reader.get(name, shape) if self.linear_bias else None

        qkv_bias = [b(p + f"self_attn.{n}_proj.bias", (d,)) for n in "qkv"]
        return OPTLayer(
            attn_norm=self._norm(reader, p + "self_attn_layer_norm"),
            qkv=reader.linear(torch.cat([reader.get(p + f"self_attn.{n}_proj.weight", (d, d)) for n in "qkv"]),
                       torch.cat(qkv_bias) if self.linear_bias else None),
            out_proj=reader.linear(reader.get(p + "self_attn.out_proj.weight", (d, d)),
                            b(p + "self_attn.out_proj.bias", (d,))),
            mlp_norm=self._norm(reader, p + "final_layer_norm"),
            fc1=reader.linear(reader.get(p + "fc1.weight", (ffn, d)), b(p + "fc1.bias", (ffn,))),
            fc2=reader.linear(reader.get(p + "fc2.weight", (d, ffn)), b(p + "fc2.bias", (d,))),
        )

    def embed(self, input_ids, positions):
        hidden = F.embedding(input_ids, self.embed_tokens)
        if self.project_in is not None:
            hidden = F.linear(hidden, self.project_in)
        return hidden + F.embedding(positions + POSITION_OFFSET, self.embed_positions)

    def _qkv(self, w: OPTLayer, hidden: torch.Tensor):
        x = w.attn_norm(hidden) if self.pre_norm else hidden
        return w.qkv(x).view(hidden.shape[0], 3, self.num_heads, self.head_dim).unbind(1)

    def fill_kv(self, index, hidden, positions, kv, slot_mapping):
        _, k, v = self._qkv(self.layers[index], hidden)
        self.ops.store_kv(k, v, kv[0], kv[1], slot_mapping)

    def layer(self, index, hidden, positions, kv, meta: AttentionMetadata):
        w = self.layers[index]
        tokens = hidden.shape[0]
        q, k, v = self._qkv(w, hidden)
        key_cache, value_cache = kv
        self.ops.store_kv(k, v, key_cache, value_cache, meta.slot_mapping)
        attn = self.ops.attention(q.contiguous(), k, v, key_cache, value_cache, meta, self.scale)
        hidden = hidden + w.out_proj(attn.view(tokens, -1))
        if not self.pre_norm:
            hidden = w.attn_norm(hidden)
        x = w.mlp_norm(hidden) if self.pre_norm else hidden
        hidden = hidden + w.fc2(self.act(w.fc1(x)))
        if not self.pre_norm:
            hidden = w.mlp_norm(hidden)
        return hidden

    def head_input(self, hidden):
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        if self.project_out is not None:
            hidden = F.linear(hidden, self.project_out)
        return hidden
