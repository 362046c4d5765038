"""helios._C.BlockAllocator: ref counts, O(1) free list, append-only tables; property tests with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helios._ext import load_extension

BlockAllocator = load_extension().BlockAllocator


def test_tables_are_append_only_and_slots_follow_them():
    alloc = BlockAllocator(8, 4)
    alloc.ensure_capacity(7, 5)
    table = alloc.block_table(7)
    assert len(table) == 2
    alloc.ensure_capacity(7, 9)
    assert alloc.block_table(7)[:2] == table and len(alloc.block_table(7)) == 3
    assert alloc.slots(7, 3, 6) == [table[0] * 4 + 3, table[1] * 4, table[1] * 4 + 1]
    with pytest.raises(IndexError):
        alloc.slots(7, 0, 13)


def test_exhaustion_raises_and_changes_nothing():
    alloc = BlockAllocator(3, 2)
    alloc.ensure_capacity(1, 4)
    with pytest.raises(RuntimeError, match="needs 2 more KV blocks, only 1 free"):
        alloc.ensure_capacity(2, 4)
    assert alloc.num_free == 1 and not alloc.has_sequence(2)


def test_refcounts_and_double_free():
    alloc = BlockAllocator(2, 16)
    block = alloc.allocate()
    alloc.incref(block)
    alloc.free(block)
    assert alloc.num_free == 1 and alloc.ref_count(block) == 1
    alloc.free(block)
    assert alloc.num_free == 2
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(block)
    with pytest.raises(IndexError):
        alloc.free(5)
    with pytest.raises(ValueError):
        BlockAllocator(4, 0)


ops = st.lists(st.tuples(st.sampled_from(["grow", "free", "share"]), st.integers(0, 5), st.integers(1, 40)),
               max_size=60)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(0, 24), block_size=st.integers(1, 8), program=ops)
def test_random_programs_never_leak_or_double_allocate(num_blocks, block_size, program):
    alloc = BlockAllocator(num_blocks, block_size)
    lengths: dict[int, int] = {}
    for op, seq, tokens in program:
        if op == "grow":
            target = lengths.get(seq, 0) + tokens
            if alloc.can_hold(seq, target):
                alloc.ensure_capacity(seq, target)
                lengths[seq] = target
            else:
                free_before = alloc.num_free
                with pytest.raises(RuntimeError):
                    alloc.ensure_capacity(seq, target)
                assert alloc.num_free == free_before
        elif op == "share" and seq not in lengths and lengths:
            # publish the first table's blocks under token-free hashes, then let seq take a prefix of them
            donor = next(iter(lengths))
            for i in range(len(alloc.block_table(donor))):
                alloc.cache_block(donor, i, donor * 1000 + i)
            hits = alloc.match_prefix(seq, [donor * 1000 + i for i in range(tokens % 4)])
            if hits:
                lengths[seq] = hits * block_size
        elif op == "free":
            alloc.free_sequence(seq)
            lengths.pop(seq, None)
        owned = [b for s in lengths for b in alloc.block_table(s)]
        counts = {b: owned.count(b) for b in owned}
        assert all(0 <= b < num_blocks and alloc.ref_count(b) == n for b, n in counts.items()), "bad ref count"
        assert len(counts) + alloc.num_free == num_blocks, "blocks leaked"
        for s, n in lengths.items():
            assert len(alloc.block_table(s)) == -(-n // block_size)
    for s in list(lengths):
        alloc.free_sequence(s)
    assert alloc.num_free == num_blocks and alloc.num_sequences == 0


def test_prefix_cache_hit_takes_blocks_back_until_first_miss():
    alloc = BlockAllocator(6, 4)
    alloc.ensure_capacity(1, 12)
    for i, h in enumerate([11, 12, 13]):
        alloc.cache_block(1, i, h)
    shared = alloc.block_table(1)
    assert alloc.match_prefix(2, [11, 12, 99, 13]) == 2  # stops at the first miss
    assert alloc.block_table(2) == shared[:2] and alloc.ref_count(shared[0]) == 2
    alloc.free_sequence(1)  # the shared blocks stay with seq 2; block 3 is free but still cached
    assert alloc.num_free == 4 and alloc.num_cached_blocks == 3
    assert alloc.match_prefix(3, [11, 12, 13]) == 3  # a free cached block comes back out of the free queue
    assert alloc.num_free == 3 and alloc.ref_count(shared[2]) == 1


def test_reallocating_a_cached_block_evicts_its_hash_lru_first():
    alloc = BlockAllocator(3, 2)
    alloc.ensure_capacity(1, 6)
    for i in range(3):
        alloc.cache_block(1, i, 100 + i)
    table = alloc.block_table(1)
    alloc.free_sequence(1)  # freed in table order: table[0] is the least recently freed
    alloc.ensure_capacity(2, 2)
    assert alloc.block_table(2) == [table[0]] and alloc.num_cached_blocks == 2
    assert alloc.match_prefix(3, [100, 101]) == 0  # block 0's hash is gone, so the chain misses at once
    alloc.reset_prefix_cache()
    assert alloc.num_cached_blocks == 0 and alloc.match_prefix(4, [101]) == 0
