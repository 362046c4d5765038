"""helios._C cache ops vs the native torch reference (float64 oracle), odd shapes, every dtype; opcheck."""

from __future__ import annotations

import pytest
import torch

import helios.ops.attention as attention_module
from helios._ext import load_extension
from helios.ops.attention import (
    AttentionMetadata,
    DenseSeq,
    PagedAttentionOps,
    dense_attention,
    paged_attention_native,
    store_kv_native,
)

load_extension()
# max |got - float64 reference|, per dtype; CUDA float32 allows for its fast-math exp
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
CUDA_FP32_TOLERANCE = 1e-4


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    return CUDA_FP32_TOLERANCE if dtype == torch.float32 and device.type == "cuda" else TOLERANCE[dtype]


def random_batch(seq_lens, q_lens, heads, kv_heads, dim, block_size, dtype, seed=0, device="cpu"):
    """Random query and caches (never zeros), block tables drawn from a shuffled pool with spare blocks."""
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
    meta = AttentionMetadata(slot_mapping=torch.zeros(qsl[-1], dtype=torch.int64, device=device),
                             block_tables=tables.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32,
                                                                                   device=device),
                             query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device))
    return query.to(device), key_cache.to(device), value_cache.to(device), meta


def reference(query, key_cache, value_cache, meta, scale, window):
    """The native op in float64 on the CPU (the oracle for every device)."""
    cpu = AttentionMetadata(slot_mapping=meta.slot_mapping.cpu(), block_tables=meta.block_tables.cpu(),
                            seq_lens=meta.seq_lens.cpu(), query_start_loc=meta.query_start_loc.cpu())
    return paged_attention_native(query.cpu().double(), key_cache.cpu().double(), value_cache.cpu().double(), cpu,
                                  scale, window)


def ext_paged_attention(query, key_cache, value_cache, meta, scale, window):
    """helios._C's op into an output poisoned with NaN, so an element it never writes fails the comparison."""
    out = torch.full_like(query, float("nan"))
    torch.ops.helios.paged_attention(out, query, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, scale, window)
    return out


def check_paged_attention(device, dtype, seq_lens, q_lens, heads, kv_heads, dim, block_size, window, seed=0):
    query, kc, vc, meta = random_batch(seq_lens, q_lens, heads, kv_heads, dim, block_size, dtype, seed, device)
    scale = dim**-0.5
    got = ext_paged_attention(query, kc, vc, meta, scale, window)
    want = reference(query, kc, vc, meta, scale, window)
    assert got.dtype == dtype and got.device.type == device.type
    tol = tolerance(dtype, device)
    torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=tol)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [  # seq_lens, q_lens, heads, kv_heads, dim, block_size
    ([1], [1], 1, 1, 8, 1),
    ([37, 5, 16], [37, 1, 16], 6, 2, 24, 16),  # prefill, decode and a full block in one step
    ([50, 3, 81], [1, 1, 1], 9, 3, 64, 16),  # SmolLM2 head layout, decode
    ([19, 40], [7, 3], 4, 4, 80, 7),  # chunk continuation, odd block size, MHA
    ([33], [33], 10, 5, 17, 5),  # head_dim not a multiple of anything
    ([70, 2], [1, 1], 4, 1, 256, 16),  # Gemma 3's head layout, decode
    ([21, 9], [1, 9], 6, 3, 32, 4),  # two 16-lane vectors per head row, blocks smaller than a vector
    ([45, 70], [1, 1], 10, 2, 64, 16),  # GQA groups of 5: attended in runs of 4 + 1 heads per K/V row
    ([30, 3], [1, 3], 14, 2, 32, 8),  # groups of 7 at two vectors per head: runs of 4 + 3
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window", [-1, 6])
def test_paged_attention_matches_reference(device, case, dtype, window):
    check_paged_attention(device, dtype, *case, window)


# Context lengths 1..600 in one batch: decodes only, or a mix of a 600-token prefill, a chunk continuation,
# decodes and a one-token sequence. GQA ratio r = heads / kv_heads; head_dim odd for r = 3.
BATCHES = {"decode": ([1, 33, 257, 600], [1, 1, 1, 1]), "mixed": ([600, 129, 17, 1], [600, 40, 1, 1])}
GQA = {1: (4, 4, 64), 3: (6, 2, 17), 4: (8, 2, 128)}  # ratio -> heads, kv_heads, head_dim


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("window", [-1, 100])
@pytest.mark.parametrize("ratio", list(GQA))
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_long_contexts_gqa_block_sizes(device, dtype, block_size, ratio, window, batch):
    heads, kv_heads, dim = GQA[ratio]
    seq_lens, q_lens = BATCHES[batch]
    check_paged_attention(device, dtype, seq_lens, q_lens, heads, kv_heads, dim, block_size, window,
                          seed=block_size + ratio)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context, new, heads, kv_heads, dim", [
    (37, 37, 9, 3, 64),  # fresh prefill, SmolLM2's GQA layout
    (33, 33, 10, 10, 17),  # fresh prefill, MHA, odd head_dim
    (40, 7, 6, 2, 24),  # new tokens after a cached prefix (explicit mask)
])
def test_dense_attention_matches_reference(device, context, new, heads, kv_heads, dim, dtype):
    g = torch.Generator().manual_seed(context + new)
    query = torch.randn(new, heads, dim, generator=g).to(dtype)
    key = torch.randn(context, kv_heads, dim, generator=g).to(dtype)
    value = torch.randn(context, kv_heads, dim, generator=g).to(dtype)
    q_pos = torch.arange(context - new, context)
    mask = None if new == context else (torch.arange(context)[None, :] <= q_pos[:, None]).to(device)
    got = dense_attention(query.to(device), key.to(device), value.to(device), dim**-0.5, mask).cpu()
    # the paged reference over a cache of one-token blocks holding exactly this context
    meta = AttentionMetadata(slot_mapping=torch.zeros(new, dtype=torch.int64),
                             block_tables=torch.arange(context, dtype=torch.int32)[None],
                             seq_lens=torch.tensor([context], dtype=torch.int32),
                             query_start_loc=torch.tensor([0, new], dtype=torch.int32))
    want = reference(query, key[:, None], value[:, None], meta, dim**-0.5, -1)
    assert got.shape == query.shape and got.dtype == dtype
    tol = tolerance(dtype, device)
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def count_dense_calls(monkeypatch, short_prefill_limit: int) -> list:
    """Sets PAGED_PREFILL_CONTEXT and records each SDPA (dense_attention) call of PagedAttentionOps.attention."""
    monkeypatch.setattr(attention_module, "PAGED_PREFILL_CONTEXT", short_prefill_limit)
    calls, dense = [], attention_module.dense_attention
    monkeypatch.setattr(attention_module, "dense_attention", lambda *args: calls.append(1) or dense(*args))
    return calls


@pytest.mark.parametrize("context, new", [(40, 40), (40, 9), (7, 7)])
@pytest.mark.parametrize("window", [5, 16])
@pytest.mark.parametrize("short_prefill_limit", [0, 512])  # 0: SDPA; 512: the paged kernel (CPU)
def test_dense_prefill_honours_a_sliding_window(device, context, new, window, short_prefill_limit, monkeypatch):
    """PagedAttentionOps.attention for a prefill sequence of a sliding-window layer vs the float64 reference, by
    SDPA or (CPU, context up to PAGED_PREFILL_CONTEXT) the paged kernel: no query attends beyond its window, fresh
    or after a cached prefix."""
    sdpa_calls = count_dense_calls(monkeypatch, short_prefill_limit)
    g = torch.Generator().manual_seed(context + new + window)
    heads, kv_heads, dim = 4, 1, 32  # Gemma-like: one KV head
    query = torch.randn(new, heads, dim, generator=g).to(device)
    key = torch.randn(context, kv_heads, dim, generator=g).to(device)
    value = torch.randn(context, kv_heads, dim, generator=g).to(device)
    cache = (key[:, None].clone(), value[:, None].clone())  # one-token blocks holding the context in order
    dense = DenseSeq(0, new)
    if new != context:
        dense.context_slots = torch.arange(context, device=device)
        q_pos = torch.arange(context - new, context, device=device)
        dense.mask = torch.arange(context, device=device)[None, :] <= q_pos[:, None]
    meta = AttentionMetadata(slot_mapping=torch.arange(context - new, context, device=device),
                             block_tables=torch.arange(context, dtype=torch.int32, device=device)[None],
                             seq_lens=torch.tensor([context], dtype=torch.int32, device=device),
                             query_start_loc=torch.tensor([0, new], dtype=torch.int32, device=device),
                             seq_lens_host=[context], query_start_loc_host=[0, new], num_paged_seqs=0, dense=[dense])
    ops = PagedAttentionOps(device)
    got = ops.attention(query, key[-new:], value[-new:], cache[0], cache[1], meta, dim**-0.5, window)
    want = reference(query, cache[0], cache[1], meta, dim**-0.5, window)
    torch.testing.assert_close(got.cpu().double(), want, atol=tolerance(torch.float32, device), rtol=1e-4)
    assert bool(sdpa_calls) == (device.type != "cpu" or context > short_prefill_limit)
    if context > window:  # the window matters: without it the result differs
        unwindowed = reference(query, cache[0], cache[1], meta, dim**-0.5, -1)
        assert not torch.allclose(unwindowed, want, atol=1e-3)


@pytest.mark.parametrize("short_prefill_limit, sdpa_calls", [(0, 3), (129, 3), (130, 0)])
def test_a_step_of_decodes_and_prefills_matches_the_reference(device, short_prefill_limit, sdpa_calls, monkeypatch):
    """A flat step (2 decodes, a fresh prefill, one after a cached prefix, and a 130-token prefill) through
    PagedAttentionOps.attention equals the float64 reference whichever way its prefills go: the whole step by the
    paged kernel on CPU when every prefill's context is within PAGED_PREFILL_CONTEXT, else each prefill by SDPA."""
    calls = count_dense_calls(monkeypatch, short_prefill_limit)
    seq_lens, q_lens, heads, kv_heads, dim, block_size = [33, 9, 20, 50, 130], [1, 1, 20, 14, 130], 6, 2, 32, 16
    query, kc, vc, meta = random_batch(seq_lens, q_lens, heads, kv_heads, dim, block_size, torch.float32, 3, device)
    qsl = meta.query_start_loc.tolist()
    meta.seq_lens_host, meta.query_start_loc_host, meta.num_paged_seqs, meta.dense = seq_lens, qsl, 2, []
    tables = meta.block_tables.long()
    key = torch.empty(qsl[-1], kv_heads, dim, device=device)
    value = torch.empty_like(key)
    for s, (ctx, new) in enumerate(zip(seq_lens, q_lens, strict=True)):
        positions = torch.arange(ctx, device=device)
        slots = tables[s][positions // block_size] * block_size + positions % block_size
        key[qsl[s]:qsl[s + 1]] = kc.flatten(0, 1)[slots[ctx - new:]]  # this step's K/V, as stored in the cache
        value[qsl[s]:qsl[s + 1]] = vc.flatten(0, 1)[slots[ctx - new:]]
        if s >= 2:
            dense = DenseSeq(qsl[s], qsl[s + 1])
            if new < ctx:
                dense.context_slots = slots
                dense.mask = positions[None, :] <= positions[ctx - new:, None]
            meta.dense.append(dense)
    got = PagedAttentionOps(device).attention(query, key, value, kc, vc, meta, dim**-0.5)
    want = reference(query, kc, vc, meta, dim**-0.5, -1)
    tol = tolerance(torch.float32, device)
    torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=tol)
    assert len(calls) == (sdpa_calls if device.type == "cpu" else 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_matches_reference_and_skips_padding(device, dtype):
    g = torch.Generator().manual_seed(1)
    num_blocks, block_size, kv_heads, dim, tokens = 7, 5, 3, 11, 13
    fused = torch.randn(tokens, 2, kv_heads, dim, generator=g).to(dtype)  # non-contiguous token stride
    key, value = fused[:, 0], fused[:, 1]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[[2, 9]] = -1
    caches = [torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    store_kv_native(key, value, expected[0], expected[1], slots)
    on_device = [c.to(device) for c in caches]
    torch.ops.helios.store_kv(key.to(device), value.to(device), on_device[0], on_device[1], slots.to(device))
    caches = [c.cpu() for c in on_device]
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(caches[0].view(-1, kv_heads, dim)[untouched], expected[0].view(-1, kv_heads, dim)[untouched])


NARROW_CACHES = [torch.float16, torch.bfloat16]  # kv_cache_dtype under a float32 model (CPU)


@pytest.mark.parametrize("cache_dtype", NARROW_CACHES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window", [-1, 6])
def test_float32_queries_over_a_narrower_cache_match_the_oracle(case, cache_dtype, window):
    """The float64 oracle over the cache's own (rounded) values, to float32's tolerance: the kernel reads 16-bit
    values exactly (the vector path for head_dim 32 / 64 / 256, the scalar one for 8 / 17 / 24 / 80)."""
    seq_lens, q_lens, heads, kv_heads, dim, block_size = case
    query, kc, vc, meta = random_batch(seq_lens, q_lens, heads, kv_heads, dim, block_size, torch.float32)
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    got = ext_paged_attention(query, kc, vc, meta, dim**-0.5, window)
    assert got.dtype == torch.float32
    want = reference(query, kc, vc, meta, dim**-0.5, window)
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE[torch.float32], rtol=1e-4)


@pytest.mark.parametrize("cache_dtype", NARROW_CACHES)
def test_store_kv_rounds_float32_into_a_narrower_cache(cache_dtype):
    g = torch.Generator().manual_seed(2)
    key, value = torch.randn(2, 9, 3, 11, generator=g)
    slots = torch.tensor([4, 0, -1, 17, 3, 8, 12, 1, 9])
    caches = [torch.zeros(4, 5, 3, 11, dtype=cache_dtype) for _ in range(2)]
    torch.ops.helios.store_kv(key, value, caches[0], caches[1], slots)
    kept = slots >= 0
    assert torch.equal(caches[0].view(-1, 3, 11)[slots[kept]], key[kept].to(cache_dtype))
    assert torch.equal(caches[1].view(-1, 3, 11)[slots[kept]], value[kept].to(cache_dtype))


def test_cache_ops_reject_a_wider_cache_than_their_values():
    """Only float32 values over a float16 / bfloat16 cache mix dtypes; the other way round is an error."""
    half = torch.ones(1, 1, 8, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="must equal the cache dtype"):
        torch.ops.helios.store_kv(half, half, torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8), torch.tensor([0]))
    query, kc, vc, meta = random_batch([3], [1], 1, 1, 8, 4, torch.float16)
    with pytest.raises(RuntimeError, match="must equal the query's"):
        ext_paged_attention(query, kc.float(), vc.float(), meta, 1.0, -1)


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


def test_opcheck_store_kv(device):
    cache = torch.randn(3, 4, 2, 8, device=device)
    kv = torch.randn(5, 2, 8, device=device)
    slots = torch.tensor([0, 5, -1, 11, 2], device=device)
    torch.library.opcheck(torch.ops.helios.store_kv.default, (kv, kv.clone(), cache, cache.clone(), slots))


def test_opcheck_paged_attention(device):
    query, kc, vc, meta = random_batch([9, 4], [3, 4], 4, 2, 16, 4, torch.float32, device=device)
    args = (torch.empty_like(query), query, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.25, -1)
    torch.library.opcheck(torch.ops.helios.paged_attention.default, args)
