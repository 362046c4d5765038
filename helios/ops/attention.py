"""Paged KV store and varlen causal paged attention.

native: plain torch, written from the definition; the oracle in tests and the path without helios._C.
ext:    helios._C (C++ on CPU, CUDA kernels on GPU), registered as torch.ops.helios.*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# CPU: a step whose prefills all have at most this many context tokens goes through the paged kernel whole. At
# SmolLM2's shapes it matches SDPA on fresh prompts up to ~512 tokens and is 1.5x (1024) to 2.3x (2048) slower beyond,
# but SDPA over a prefix-cache hit first gathers the cached K/V and masks explicitly: 32 chat prompts that share
# their system-prompt block spent ~0.55 s of a ~2.4 s prefill there, 0.12 s in the paged kernel.
PAGED_PREFILL_CONTEXT = 512


@dataclass
class DenseSeq:
    """A sequence attended densely this step: a fresh prefill, or new tokens after a cached prefix."""

    start: int  # its tokens in the flat batch: [start, end)
    end: int
    context_slots: torch.Tensor | None = None  # int64 [context]: cache slots of its whole context; None = fresh
    mask: torch.Tensor | None = None  # bool [new tokens, context]: causal mask offset by the cached prefix
    _window_masks: dict | None = None  # sliding window -> mask, built once per step and shared by its layers

    @property
    def context(self) -> int:
        return self.end - self.start if self.context_slots is None else self.context_slots.shape[0]

    def attention_mask(self, window: int, device: torch.device) -> torch.Tensor | None:
        """The mask of this sequence's queries over its context: None means plainly causal (is_causal); with a
        sliding window, each query also sees only the `window` newest positions (itself included)."""
        if window <= 0 or self.context <= window:
            return self.mask
        if self._window_masks is None:
            self._window_masks = {}
        if window not in self._window_masks:
            context, new = self.context, self.end - self.start
            keys = torch.arange(context, device=device)
            queries = torch.arange(context - new, context, device=device)
            band = (keys[None, :] <= queries[:, None]) & (keys[None, :] > queries[:, None] - window)
            self._window_masks[window] = band
        return self._window_masks[window]


@dataclass
class AttentionMetadata:
    """Per-step attention inputs (vLLM names). One entry per sequence unless said otherwise."""

    slot_mapping: torch.Tensor  # int64 [tokens]: cache slot of each new token, -1 = skip
    block_tables: torch.Tensor  # int32 [seqs, max_blocks], padded with 0 past each table's end
    seq_lens: torch.Tensor  # int32 [seqs]: context length incl. this step's tokens
    query_start_loc: torch.Tensor  # int32 [seqs + 1]: offsets of each sequence's tokens in the flat batch
    seq_lens_host: list[int] | None = None  # the same on the host, for the native path (no device syncs)
    query_start_loc_host: list[int] | None = None
    # Sequences [0, num_paged_seqs) go through the paged kernel (decodes); `dense` lists the others.
    # None: every sequence goes through the paged kernel.
    num_paged_seqs: int | None = None
    dense: list[DenseSeq] | None = None
    _paged: AttentionMetadata | None = None
    _short_prefills: bool | None = None

    def prefills_are_short(self) -> bool:
        """Every dense sequence's context is at most PAGED_PREFILL_CONTEXT tokens (computed once per step)."""
        if self._short_prefills is None:
            self._short_prefills = all(seq.context <= PAGED_PREFILL_CONTEXT for seq in self.dense or ())
        return self._short_prefills

    @property
    def num_paged_tokens(self) -> int:
        return self.query_start_loc_host[self.num_paged_seqs]

    def paged_part(self) -> AttentionMetadata:
        """The metadata of sequences [0, num_paged_seqs) alone (views, computed once per step)."""
        if self._paged is None:
            n = self.num_paged_seqs
            self._paged = AttentionMetadata(
                slot_mapping=self.slot_mapping[: self.num_paged_tokens], block_tables=self.block_tables[:n],
                seq_lens=self.seq_lens[:n], query_start_loc=self.query_start_loc[: n + 1],
                seq_lens_host=self.seq_lens_host[:n], query_start_loc_host=self.query_start_loc_host[: n + 1])
        return self._paged


def store_kv_native(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    key_cache.view(-1, kv_heads, head_dim)[slots] = key[keep]
    value_cache.view(-1, kv_heads, head_dim)[slots] = value[keep]


def paged_attention_native(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, sliding_window: int = -1) -> torch.Tensor:
    """softmax(q·kᵀ·scale + causal mask) · v for each sequence, gathering K/V through its block table."""
    out = torch.empty_like(query)
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = query.shape[1] // kv_heads
    seq_lens = meta.seq_lens_host or meta.seq_lens.tolist()
    qsl = meta.query_start_loc_host or meta.query_start_loc.tolist()
    for s, ctx in enumerate(seq_lens):
        start, end = qsl[s], qsl[s + 1]
        if end == start:
            continue
        positions = torch.arange(ctx, device=query.device)
        slots = meta.block_tables[s].long()[positions // block_size] * block_size + positions % block_size
        k = key_cache.flatten(0, 1)[slots].float().repeat_interleave(group, dim=1)  # [ctx, heads, dim]
        v = value_cache.flatten(0, 1)[slots].float().repeat_interleave(group, dim=1)
        q = query[start:end].float()  # [q_len, heads, dim]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(ctx - (end - start), ctx, device=query.device)
        allowed = positions[None, :] <= q_pos[:, None]
        if sliding_window > 0:
            allowed &= positions[None, :] > q_pos[:, None] - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(query.dtype)
    return out


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of one sequence: query [new, heads, dim] over key/value [context, kv_heads, dim].

    mask=None means new == context (a fresh prefill); otherwise mask [new, context] says what each query sees.
    """
    # 4-D inputs: with 3-D ones torch takes its slow "math" path on CPU instead of the flash kernel (~3x slower)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None], attn_mask=mask,
        is_causal=mask is None, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    return out[0].transpose(0, 1)


class PagedAttentionOps:
    """store_kv + paged_attention bound to one implementation for the life of a model runner."""

    def __init__(self, device: torch.device, backend: str | None = None):
        if backend is None:
            from helios._ext import extension_available

            backend = "ext" if extension_available() and self._ext_supports(device) else "native"
        if backend not in {"ext", "native"}:
            raise ValueError(f"attention backend must be 'ext' or 'native', got {backend!r}")
        if backend == "ext":
            from helios._ext import load_extension

            load_extension()
        self.backend = backend
        self.pages_short_prefills = backend == "ext" and device.type == "cpu"  # see PAGED_PREFILL_CONTEXT

    @staticmethod
    def _ext_supports(device: torch.device) -> bool:
        if device.type == "cpu":
            return True
        from helios._ext import load_extension

        return bool(load_extension().built_with_cuda)

    def store_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        if self.backend == "ext":
            torch.ops.helios.store_kv(key, value, key_cache, value_cache, slot_mapping)
        else:
            store_kv_native(key, value, key_cache, value_cache, slot_mapping)

    def attention(self, query, key, value, key_cache, value_cache, meta: AttentionMetadata, scale: float,
                  sliding_window: int = -1) -> torch.Tensor:
        """Attention of this step's queries; key/value are this step's (already stored in the cache). A layer with
        a sliding window attends within it on both paths (the paged kernel and dense prefill)."""
        all_paged = meta.num_paged_seqs is None or not meta.dense or (
            self.pages_short_prefills and meta.prefills_are_short())
        if all_paged:  # one kernel call, no copy into `out`
            return self.paged_attention(query, key_cache, value_cache, meta, scale, sliding_window)
        out = torch.empty_like(query)
        paged_tokens = meta.num_paged_tokens
        if paged_tokens:
            out[:paged_tokens] = self.paged_attention(query[:paged_tokens], key_cache, value_cache,
                                                      meta.paged_part(), scale, sliding_window)
        kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
        for seq in meta.dense:
            q = query[seq.start:seq.end]
            mask = seq.attention_mask(sliding_window, query.device)
            if seq.context_slots is None:
                k, v = key[seq.start:seq.end], value[seq.start:seq.end]
            else:
                # (a float16 / bfloat16 cache under float32 queries: kv_cache_dtype)
                k = key_cache.view(-1, kv_heads, head_dim)[seq.context_slots].to(query.dtype)
                v = value_cache.view(-1, kv_heads, head_dim)[seq.context_slots].to(query.dtype)
            out[seq.start:seq.end] = dense_attention(q, k, v, scale, mask)
        return out

    def paged_attention(self, query, key_cache, value_cache, meta: AttentionMetadata, scale: float,
                        sliding_window: int = -1) -> torch.Tensor:
        if self.backend == "native":
            return paged_attention_native(query, key_cache, value_cache, meta, scale, sliding_window)
        out = torch.empty_like(query)
        torch.ops.helios.paged_attention(out, query, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                                         meta.query_start_loc, scale, sliding_window)
        return out
