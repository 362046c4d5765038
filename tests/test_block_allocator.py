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


ops = st.lists(st.tuples(st.sampled_from(["grow", "free"]), st.integers(0, 5), st.integers(1, 40)), max_size=60)


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
        else:
            alloc.free_sequence(seq)
            lengths.pop(seq, None)
        owned = [b for s in lengths for b in alloc.block_table(s)]
        assert len(owned) == len(set(owned)), "a block is in two tables"
        assert all(0 <= b < num_blocks and alloc.ref_count(b) == 1 for b in owned)
        assert len(owned) + alloc.num_free == num_blocks, "blocks leaked"
        for s, n in lengths.items():
            assert len(alloc.block_table(s)) == -(-n // block_size)
    for s in list(lengths):
        alloc.free_sequence(s)
    assert alloc.num_free == num_blocks and alloc.num_sequences == 0
