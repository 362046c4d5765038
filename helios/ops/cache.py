"""Fake (meta) kernels of helios._C's tensor ops, so torch.compile, FakeTensor and opcheck understand them.

The cache ops and rotary_embedding mutate their arguments and return nothing; the softmax-row ops return per-row
vectors; rms_norm, silu_and_mul and the quantized linears return new tensors.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("helios::store_kv")
def _store_kv_fake(key, value, key_cache, value_cache, slot_mapping) -> None:
    return None


@torch.library.register_fake("helios::paged_attention")
def _paged_attention_fake(out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                          sliding_window) -> None:
    return None


@torch.library.register_fake("helios::softmax_rows_")
def _softmax_rows_fake(logits):
    rows = logits.shape[0]
    return logits.new_empty(rows), logits.new_empty(rows, dtype=torch.int64)


@torch.library.register_fake("helios::distill_rows_")
def _distill_rows_fake(logits, probs, target, ce_weight, grad_scale, write_grad):
    rows = logits.shape[0]
    return logits.new_empty(rows), logits.new_empty(rows), logits.new_empty(rows, dtype=torch.int64)


@torch.library.register_fake("helios::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


@torch.library.register_fake("helios::rotary_embedding")
def _rotary_embedding_fake(positions, query, key, cos, sin) -> None:
    return None


@torch.library.register_fake("helios::silu_and_mul")
def _silu_and_mul_fake(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.register_fake("helios::int8_linear")
def _int8_linear_fake(x, qweight, scale, minimum, out_features, bias=None, residual=None, round_activations=False):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.register_fake("helios::int4_linear")
def _int4_linear_fake(x, qweight, scale, minimum, out_features, bias=None, residual=None, round_activations=False):
    return x.new_empty(*x.shape[:-1], out_features)
