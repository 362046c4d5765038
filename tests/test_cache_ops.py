"""helios._C cache ops vs the native torch reference (float64 oracle), odd shapes, every dtype; opcheck."""

from __future__ import annotations

import pytest
import torch

from helios._ext import load_extension
from helios.ops.attention import (
    AttentionMetadata,
    PagedAttentionOps,
    dense_attention,
    paged_attention_native,
    store_kv_native,
)

load_extension()
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def random_batch(seq_lens, q_lens, heads, kv_heads, dim, block_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    num_blocks = len(seq_lens) * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)  # scattered, non-contiguous block tables
    tables = perm[: len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks).to(torch.int32)
    key_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    query = torch.randn(qsl[-1], heads, dim, generator=g).to(dtype)
    meta = AttentionMetadata(slot_mapping=torch.zeros(qsl[-1], dtype=torch.int64), block_tables=tables,
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                             query_start_loc=torch.tensor(qsl, dtype=torch.int32))
    return query, key_cache, value_cache, meta


def reference(query, key_cache, value_cache, meta, scale, window):
    out = paged_attention_native(query.double(), key_cache.double(), value_cache.double(), meta, scale, window)
    return out


CASES = [  # seq_lens, q_lens, heads, kv_heads, dim, block_size
    ([1], [1], 1, 1, 8, 1),
    ([37, 5, 16], [37, 1, 16], 6, 2, 24, 16),  # prefill, decode and a full block in one step
    ([50, 3, 81], [1, 1, 1], 9, 3, 64, 16),  # SmolLM2 head layout, decode
    ([19, 40], [7, 3], 4, 4, 80, 7),  # chunk continuation, odd block size, MHA
    ([33], [33], 10, 5, 17, 5),  # head_dim not a multiple of anything
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window", [-1, 6])
def test_paged_attention_matches_reference(case, dtype, window):
    seq_lens, q_lens, heads, kv_heads, dim, block_size = case
    query, kc, vc, meta = random_batch(seq_lens, q_lens, heads, kv_heads, dim, block_size, dtype)
    scale = dim**-0.5
    got = PagedAttentionOps(torch.device("cpu"), backend="ext").paged_attention(query, kc, vc, meta, scale, window)
    want = reference(query, kc, vc, meta, scale, window)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context, new, heads, kv_heads, dim", [
    (37, 37, 9, 3, 64),  # fresh prefill, SmolLM2's GQA layout
    (33, 33, 10, 10, 17),  # fresh prefill, MHA, odd head_dim
    (40, 7, 6, 2, 24),  # new tokens after a cached prefix (explicit mask)
])
def test_dense_attention_matches_reference(context, new, heads, kv_heads, dim, dtype):
    g = torch.Generator().manual_seed(context + new)
    query = torch.randn(new, heads, dim, generator=g).to(dtype)
    key = torch.randn(context, kv_heads, dim, generator=g).to(dtype)
    value = torch.randn(context, kv_heads, dim, generator=g).to(dtype)
    q_pos = torch.arange(context - new, context)
    mask = None if new == context else torch.arange(context)[None, :] <= q_pos[:, None]
    got = dense_attention(query, key, value, dim**-0.5, mask)
    # the paged reference over a cache of one-token blocks holding exactly this context
    meta = AttentionMetadata(slot_mapping=torch.zeros(new, dtype=torch.int64),
                             block_tables=torch.arange(context, dtype=torch.int32)[None],
                             seq_lens=torch.tensor([context], dtype=torch.int32),
                             query_start_loc=torch.tensor([0, new], dtype=torch.int32))
    want = reference(query, key[:, None], value[:, None], meta, dim**-0.5, -1)
    assert got.shape == query.shape and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_reference_and_skips_padding(dtype):
    g = torch.Generator().manual_seed(1)
    num_blocks, block_size, kv_heads, dim, tokens = 7, 5, 3, 11, 13
    fused = torch.randn(tokens, 2, kv_heads, dim, generator=g).to(dtype)  # non-contiguous token stride
    key, value = fused[:, 0], fused[:, 1]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[[2, 9]] = -1
    caches = [torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    store_kv_native(key, value, expected[0], expected[1], slots)
    torch.ops.helios.store_kv(key, value, caches[0], caches[1], slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(caches[0].view(-1, kv_heads, dim)[untouched], expected[0].view(-1, kv_heads, dim)[untouched])


def test_store_kv_rejects_slot_outside_cache():
    cache = torch.zeros(2, 4, 1, 8)
    kv = torch.ones(1, 1, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.helios.store_kv(kv, kv, cache, cache.clone(), torch.tensor([8]))


def test_paged_attention_rejects_bad_metadata():
    query, kc, vc, meta = random_batch([4], [4], 2, 1, 8, 4, torch.float32)
    with pytest.raises(RuntimeError, match="block_tables must be"):
        torch.ops.helios.paged_attention(torch.empty_like(query), query, kc, vc, meta.block_tables.long(),
                                         meta.seq_lens, meta.query_start_loc, 1.0, -1)
    with pytest.raises(RuntimeError, match="longer than its block table"):
        torch.ops.helios.paged_attention(torch.empty_like(query), query, kc, vc, meta.block_tables,
                                         torch.tensor([99], dtype=torch.int32), meta.query_start_loc, 1.0, -1)


def test_opcheck_store_kv():
    cache = torch.zeros(3, 4, 2, 8)
    kv = torch.randn(5, 2, 8)
    slots = torch.tensor([0, 5, -1, 11, 2])
    torch.library.opcheck(torch.ops.helios.store_kv.default, (kv, kv.clone(), cache, cache.clone(), slots))


def test_opcheck_paged_attention():
    query, kc, vc, meta = random_batch([9, 4], [3, 4], 4, 2, 16, 4, torch.float32)
    args = (torch.empty_like(query), query, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.25, -1)
    torch.library.opcheck(torch.ops.helios.paged_attention.default, args)
