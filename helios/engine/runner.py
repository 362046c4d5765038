"""Runs one engine step: flattens the scheduled sequences into one batch over the paged KV cache,
runs layers 1..L, computes logits only at each sequence's last position, and samples."""

from __future__ import annotations

import math
import time

import torch

from helios.engine.exit_step import ExitForward, TokenChoice
from helios.engine.probes import ProbeLog, synchronize
from helios.engine.sampler import needs_logits, prompt_token_logprobs, sample
from helios.engine.scheduler import ScheduledSeq
from helios.exits.config import ExitPolicy
from helios.kv.cache import KVCache
from helios.model.base import DecoderModel
from helios.ops import AttentionMetadata
from helios.ops.attention import DenseSeq


class ModelRunner:
    def __init__(self, model: DecoderModel, kv_cache: KVCache, device: torch.device, seed: int = 0,
                 exit_policy: ExitPolicy | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.kv_layers = kv_cache.layers()
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.exits = None
        self.set_exit_policy(exit_policy)
        self.stop_ids: frozenset[int] = frozenset()  # EOS ids: masked for rows still below their min_tokens
        self.probes: ProbeLog | None = None  # profiling: full depth, every probe exit evaluated (no early exit)

    def set_exit_policy(self, policy: ExitPolicy | None) -> None:
        self.exits = ExitForward(self.model, policy, self.kv_layers, self.generator) if policy else None
        if self.exits is not None:
            self.exits.stop_ids = getattr(self, "_stop_ids", frozenset())

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._stop_ids

    @stop_ids.setter
    def stop_ids(self, ids: frozenset[int]) -> None:
        self._stop_ids = frozenset(ids)
        if self.exits is not None:
            self.exits.stop_ids = self._stop_ids

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

        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(padded, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            query_start_loc=tensor(query_start_loc, torch.int32),
            seq_lens_host=seq_lens,
            query_start_loc_host=query_start_loc,
        )
        self._split_dense(batch, meta, query_start_loc)
        last = tensor([q - 1 for q in query_start_loc[1:]], torch.int64)
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta, last

    def _split_dense(self, batch: list[ScheduledSeq], meta: AttentionMetadata, query_start_loc: list[int]) -> None:
        """Leading decodes go to the paged kernel; every later sequence is attended densely (the scheduler
        lists decodes first, so in practice these are prefills, fresh or after a prefix-cache hit)."""
        paged = 0
        while paged < len(batch) and batch[paged].num_new_tokens == 1 and batch[paged].seq.num_computed_tokens > 0:
            paged += 1
        meta.num_paged_seqs = paged
        meta.dense = []
        for i in range(paged, len(batch)):
            seq, new = batch[i].seq, batch[i].num_new_tokens
            dense = DenseSeq(query_start_loc[i], query_start_loc[i + 1])
            cached = seq.num_computed_tokens
            if cached:
                context = cached + new
                slots = self.kv_cache.allocator.slots(seq.seq_id, 0, context)
                dense.context_slots = torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)
                positions = torch.arange(context, device=self.device)
                dense.mask = positions[None, :] <= positions[cached:, None]
            meta.dense.append(dense)

    @torch.inference_mode()
    def step(self, batch: list[ScheduledSeq]) -> list[TokenChoice]:
        input_ids, positions, meta, last = self.prepare(batch)
        if self.probes is not None:
            choices, hidden = self._probed_step(batch, input_ids, positions, meta, last)
        elif self.exits is not None:
            choices, hidden, meta = self.exits.run(batch, input_ids, positions, meta)
        else:
            hidden = self.model.forward(input_ids, positions, self.kv_layers, meta)
            seqs = [item.seq for item in batch]
            rows = hidden[last]
            if rows.device.type == "cpu" and not any(needs_logits(s) for s in seqs):
                # plain greedy rows on CPU: argmax and max prob chunk by chunk from the very logits compute_logits
                # would make, without writing [batch, vocab] logits
                token_t, p1_t = self.model.greedy_head(rows)
                tokens, p1, logprobs = token_t.tolist(), p1_t.tolist(), [None] * len(seqs)
            else:
                logits = self.model.compute_logits(rows).float()
                tokens, logprobs = sample(logits, seqs, self.generator, self.stop_ids)
                p1 = (logits.max(dim=-1).values - logits.logsumexp(dim=-1)).exp().tolist()
            # telemetry of plain decoding: every token leaves at the last loaded layer; confidence = max prob
            depth = self.model.loaded_layers
            choices = [TokenChoice(t, depth, c, False, lp) for t, c, lp in zip(tokens, p1, logprobs, strict=True)]
        self._prompt_logprobs(batch, hidden, meta, choices)
        for item in batch:
            item.seq.num_computed_tokens += item.num_new_tokens
        return choices

    def _probed_step(self, batch: list[ScheduledSeq], input_ids: torch.Tensor, positions: torch.Tensor,
                     meta: AttentionMetadata, last: torch.Tensor) -> tuple[list[TokenChoice], torch.Tensor]:
        """Plain full-depth decoding that also records, per token, every probe exit's confidence and agreement,
        the tokens' and prompts' log-likelihood, and layer / exit-check time (see helios.engine.probes)."""
        model, probes = self.model, self.probes
        states = {}
        synchronize(input_ids.device)
        start = time.perf_counter()
        hidden = model.embed(input_ids, positions)
        for i in range(model.loaded_layers):
            hidden = model.layer(i, hidden, positions, self.kv_layers[i], meta)
            if i + 1 in probes.layers:
                states[i + 1] = hidden[last]
        synchronize(input_ids.device)
        probes.layer_seconds += time.perf_counter() - start
        probes.layer_steps += model.loaded_layers
        seqs = [item.seq for item in batch]
        request_ids = [s.request_id for s in seqs]
        rows = hidden[last]
        if rows.device.type == "cpu" and not any(needs_logits(s) for s in seqs):
            token_t, p1_t = probes.record_greedy(model, states, rows)
            tokens, p1, logprobs = token_t.tolist(), p1_t.tolist(), [None] * len(seqs)
            probes.record_output_nats(request_ids, [-math.log(max(p, 1e-45)) for p in p1])  # the argmax's -ln p
        else:
            logits = model.compute_logits(rows).float()
            tokens, logprobs = sample(logits, seqs, self.generator, self.stop_ids)
            log_probs = logits.log_softmax(-1)
            probes.record_exits(model, states, logits.argmax(-1))
            probes.record_outputs(request_ids, log_probs, tokens)
            p1 = log_probs.max(-1).values.exp().tolist()
        first_dense = len(batch) - len(meta.dense or [])
        for k, dense in enumerate(meta.dense or []):
            seq = batch[first_dense + k].seq
            if seq.num_computed_tokens == 0 and seq.request_id not in probes.prompt_nats:
                probes.record_prompt(model, seq.request_id, hidden[dense.start:dense.start + seq.prompt_len - 1],
                                     seq.prompt_token_ids)
        depth = model.loaded_layers
        return [TokenChoice(t, depth, c, False, lp) for t, c, lp in zip(tokens, p1, logprobs, strict=True)], hidden

    def _prompt_logprobs(self, batch: list[ScheduledSeq], hidden: torch.Tensor, meta: AttentionMetadata,
                         choices: list[TokenChoice]) -> None:
        """Prompt logprobs for sequences prefilled from position 0 this step that asked for them (the scheduler
        never serves such prompts from the prefix cache). Prefills are the batch's dense sequences, in order."""
        first_dense = len(batch) - len(meta.dense or [])
        for k, dense in enumerate(meta.dense or []):
            seq = batch[first_dense + k].seq
            if seq.params.prompt_logprobs is None or seq.prompt_logprobs is not None or seq.index != 0:
                continue
            rows = hidden[dense.start:dense.start + seq.prompt_len - 1]
            choices[first_dense + k].prompt_logprobs = prompt_token_logprobs(
                self.model.compute_logits, rows, seq.prompt_token_ids, seq.params.prompt_logprobs)
