"""Runs one engine step: flattens the scheduled sequences into one batch over the paged KV cache,
runs layers 1..L, computes logits only at each sequence's last position, and samples."""

from __future__ import annotations

import torch

from helios.engine.sampler import sample
from helios.engine.scheduler import ScheduledSeq
from helios.kv.cache import KVCache
from helios.model.base import DecoderModel
from helios.ops import AttentionMetadata


class ModelRunner:
    def __init__(self, model: DecoderModel, kv_cache: KVCache, device: torch.device, seed: int = 0):
        self.model = model
        self.kv_cache = kv_cache
        self.kv_layers = kv_cache.layers()
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)

    def prepare(self, batch: list[ScheduledSeq]):
        allocator = self.kv_cache.allocator
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        tables = []
        for item in batch:
            seq = item.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(allocator.slots(seq.seq_id, start, end))
            seq_lens.append(end)
            query_start_loc.append(query_start_loc[-1] + item.num_new_tokens)
            tables.append(allocator.block_table(seq.seq_id))
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        # Sequences after the last one with cached context are fresh prefills (the scheduler lists decodes first).
        cached = [i for i, item in enumerate(batch) if item.seq.num_computed_tokens > 0]
        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(padded, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            query_start_loc=tensor(query_start_loc, torch.int32),
            seq_lens_host=seq_lens,
            query_start_loc_host=query_start_loc,
            num_paged_seqs=cached[-1] + 1 if cached else 0,
        )
        last = tensor([q - 1 for q in query_start_loc[1:]], torch.int64)
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta, last

    @torch.inference_mode()
    def step(self, batch: list[ScheduledSeq]) -> list[int]:
        input_ids, positions, meta, last = self.prepare(batch)
        hidden = self.model.forward(input_ids, positions, self.kv_layers, meta)
        logits = self.model.compute_logits(hidden[last]).float()
        for item in batch:
            item.seq.num_computed_tokens += item.num_new_tokens
        return sample(logits, [item.seq for item in batch], self.generator)
