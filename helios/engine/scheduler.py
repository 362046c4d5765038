"""Continuous batching over the paged KV cache (nano-vllm's policy, vLLM v1's mixed steps).

Each step: running sequences decode one token each (oldest first); when a sequence needs a block and
none is free, the newest running sequence is preempted by recompute (blocks freed, re-queued at the
front, re-prefilled later). Then waiting sequences are admitted whole while blocks, the token budget
and max_num_seqs allow. Nothing is dropped: a preempted sequence keeps its generated tokens.
With prefix caching, an admitted sequence first takes the cached blocks of its leading full blocks
and computes only the rest (a preempted sequence usually finds its own blocks still cached).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from helios.engine.sequence import Sequence, Status
from helios.kv.prefix import extend_hashes


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens to compute this step (whole uncomputed prefix for prefill, 1 for decode)


class Scheduler:
    def __init__(self, allocator, max_num_seqs: int, max_num_batched_tokens: int, prefix_caching: bool = True):
        self.allocator = allocator
        self.prefix_caching = prefix_caching
        self.block_size = allocator.block_size
        self.num_prompt_tokens = 0  # tokens admitted for prefill (incl. recomputation)
        self.num_cached_tokens = 0  # of those, tokens served from the prefix cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free_sequence(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_published_blocks = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[ScheduledSeq]:
        scheduled: list[ScheduledSeq] = []
        budget = self.max_num_batched_tokens
        # 1. decode the running sequences, preempting the newest when blocks run out
        kept: deque[Sequence] = deque()
        while self.running:
            seq = self.running.popleft()
            while not self.allocator.can_hold(seq.seq_id, seq.num_tokens):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.allocator.ensure_capacity(seq.seq_id, seq.num_tokens)
                self._publish_blocks(seq)
                scheduled.append(ScheduledSeq(seq, seq.num_tokens - seq.num_computed_tokens))
                budget -= scheduled[-1].num_new_tokens
                kept.append(seq)
        self.running = kept
        # 2. admit waiting sequences whole (a preempted one recomputes prompt + generated tokens)
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached_blocks = self._match_prefix(seq)
            new_tokens = seq.num_tokens - cached_blocks * self.block_size
            # Keep one block per running sequence in reserve so admission does not force preemption next step.
            reserve = len(self.running)
            fits = self.allocator.blocks_needed(seq.seq_id, seq.num_tokens) + reserve <= self.allocator.num_free
            if (new_tokens > budget and scheduled) or (not fits and (self.running or scheduled)):
                self.allocator.free_sequence(seq.seq_id)  # give back the cached blocks it took
                break
            if not self.allocator.can_hold(seq.seq_id, seq.num_tokens):
                self.allocator.free_sequence(seq.seq_id)
                raise RuntimeError(f"sequence of {seq.num_tokens} tokens cannot fit in an empty KV pool "
                                   f"({self.allocator.num_blocks} blocks of {self.allocator.block_size})")
            self.waiting.popleft()
            self.allocator.ensure_capacity(seq.seq_id, seq.num_tokens)
            seq.num_computed_tokens = cached_blocks * self.block_size
            seq.num_published_blocks = cached_blocks
            self._publish_blocks(seq)
            self.num_prompt_tokens += seq.num_tokens
            self.num_cached_tokens += seq.num_computed_tokens
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, new_tokens))
            budget -= new_tokens
        return scheduled

    def _match_prefix(self, seq: Sequence) -> int:
        """Takes the cached blocks of seq's leading full blocks; returns how many (0 without caching)."""
        if not self.prefix_caching or seq.params.prompt_logprobs is not None:  # those need every prompt position
            return 0
        # At least one token must be computed: its logits give the next token.
        limit = (seq.num_tokens - 1) // self.block_size
        return self.allocator.match_prefix(seq.seq_id, extend_hashes(seq.block_hashes, seq.token_ids,
                                                                     self.block_size, limit))

    def _publish_blocks(self, seq: Sequence) -> None:
        """Offers the blocks this step fills to the prefix cache, at scheduling time (as vLLM v1 does).

        Safe within the step: every layer stores the whole batch's K/V before any attention reads it, so a
        sequence admitted later in the same batch may already read a prefix computed alongside it.
        """
        if not self.prefix_caching:
            return
        full = seq.num_tokens // self.block_size
        if full <= seq.num_published_blocks:
            return
        hashes = extend_hashes(seq.block_hashes, seq.token_ids, self.block_size, full)
        for index in range(seq.num_published_blocks, full):
            self.allocator.cache_block(seq.seq_id, index, hashes[index])
        seq.num_published_blocks = full

    def finish(self, seq: Sequence) -> None:
        """Ends a sequence, running or still waiting (an abort may come before it was ever scheduled)."""
        queue = self.running if seq.status is Status.RUNNING else self.waiting
        seq.status = Status.FINISHED
        self.allocator.free_sequence(seq.seq_id)
        queue.remove(seq)
