"""Fake (meta) kernels of helios._C's tensor ops, so torch.compile, FakeTensor and opcheck understand them.

The cache ops mutate their arguments and return nothing; the softmax-row ops return per-row vectors.
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
