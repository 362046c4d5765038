"""Fake (meta) kernels of helios._C's tensor ops, so torch.compile, FakeTensor and opcheck understand them.

The ops mutate their cache/out arguments and return nothing, so the fake kernels only have to exist.
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
