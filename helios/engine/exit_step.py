"""One engine step with early exits inside the layer stack.

Decode rows (one new token per sequence, through the paged kernel) may leave at any exit layer whose
confidence test they pass; the rest continue with a smaller batch. A row that left at layer e still
gives K/V to layers e+1..L, computed from its exited hidden state by that layer's input norm and K/V
projections (hidden-state propagation, as in CALM and DREX); when every row has left, the deeper layers
run only this fill. Prefill rows run every loaded layer (their K/V are needed anyway) and the first
token is chosen at the first exit that passes, like any other. The last loaded layer is always an exit:
a token forced out there below the threshold is a confidence breach.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from helios.engine.sampler import TokenLogprobs, needs_logits, sample
from helios.engine.scheduler import ScheduledSeq
from helios.exits.config import ExitPolicy
from helios.model.base import DecoderModel
from helios.ops.attention import AttentionMetadata


@dataclass
class TokenChoice:
    token: int
    exit_layer: int  # 1-based
    confidence: float  # the configured measure (max_prob when no early exit is configured)
    breach: bool  # left at the last loaded layer without passing the threshold
    logprobs: TokenLogprobs | None = None  # when the sequence asked for them: from the exit that chose the token
    prompt_logprobs: list[TokenLogprobs] | None = None  # set on the step that prefilled a prompt asking for them


def confidence_from_logits(logits: torch.Tensor):
    """(p1, p2, entropy) of softmax(logits) per row, like the exit head computes without logits."""
    log_probs = logits.float().log_softmax(-1)
    top = log_probs.topk(2, dim=-1).values.exp()
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return top[:, 0], top[:, 1], entropy


def drop_paged_rows(meta: AttentionMetadata, keep: list[bool], device: torch.device) -> AttentionMetadata:
    """Metadata of the same step without the paged (decode) sequences whose keep flag is False."""
    paged = meta.num_paged_seqs
    kept = [i for i in range(paged) if keep[i]]
    removed = paged - len(kept)
    seqs = kept + list(range(paged, len(meta.seq_lens_host)))
    index = torch.tensor(seqs, dtype=torch.int64, device=device)
    rows = torch.tensor(kept, dtype=torch.int64, device=device)
    q_lens = [meta.query_start_loc_host[s + 1] - meta.query_start_loc_host[s] for s in seqs]
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    seq_lens = [meta.seq_lens_host[s] for s in seqs]
    return AttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping[:paged][rows], meta.slot_mapping[paged:]]),
        block_tables=meta.block_tables[index],
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(device),
        seq_lens_host=seq_lens,
        query_start_loc_host=qsl,
        num_paged_seqs=len(kept),
        dense=[dataclasses.replace(d, start=d.start - removed, end=d.end - removed) for d in meta.dense],
    )


class ExitForward:
    def __init__(self, model: DecoderModel, policy: ExitPolicy, kv_layers, generator: torch.Generator):
        self.model = model
        self.policy = policy
        self.exits = set(policy.layers)
        self.kv_layers = kv_layers
        self.generator = generator
        self.stop_ids: frozenset[int] = frozenset()  # EOS ids, masked for rows below their min_tokens

    def _decide(self, hidden_rows: torch.Tensor, seqs: list, layer: int, final: bool) -> list[TokenChoice | None]:
        """Exit test at `layer` for these rows; None for rows that stay (never at the final layer)."""
        greedy = not any(needs_logits(s) for s in seqs)  # plain argmax rows: the fused head, no logits
        if final and greedy and self.policy.confidence == "max_prob" and hidden_rows.device.type == "cpu":
            # the last layer of a greedy batch on CPU: plain decoding's own chunked argmax and max prob, no
            # [batch, vocab] logits (HELIOS' truncated depth pays nothing for its breach test)
            tokens, p1 = self.model.greedy_head(hidden_rows)
            return self._leave_all(tokens.tolist(), p1, layer)
        if final:
            logits = self.model.compute_logits(hidden_rows).float()  # exactly plain decoding's last layer
        elif not greedy:
            logits = self.model.exit_logits(hidden_rows, layer).float()
        else:
            logits = None
        if logits is not None:
            p1, p2, entropy = confidence_from_logits(logits)
            tokens = None
        else:
            tokens, p1, p2, entropy = self.model.exit_head(hidden_rows, layer)
        passed = self.policy.passes(layer, p1, p2, entropy).tolist()
        measure = self.policy.measure(p1, p2, entropy).tolist()
        leaving = [i for i, ok in enumerate(passed) if ok or final]
        if not leaving:
            return [None] * len(seqs)
        if logits is not None:
            chosen, logprobs = sample(logits[leaving], [seqs[i] for i in leaving], self.generator, self.stop_ids)
        else:
            chosen, logprobs = tokens[leaving].tolist(), [None] * len(leaving)
        out: list[TokenChoice | None] = [None] * len(seqs)
        for i, token, lp in zip(leaving, chosen, logprobs, strict=True):
            out[i] = TokenChoice(int(token), layer, float(measure[i]), breach=final and not passed[i], logprobs=lp)
        return out

    def _leave_all(self, tokens: list[int], p1: torch.Tensor, layer: int) -> list[TokenChoice]:
        """Every row leaves at the last layer; below the threshold it is a breach."""
        passed = (p1 >= self.policy.thresholds[layer]).tolist()
        return [TokenChoice(t, layer, float(c), breach=not ok) for t, c, ok in zip(tokens, p1.tolist(), passed,
                                                                                  strict=True)]

    def run(self, batch: list[ScheduledSeq], input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> tuple[list[TokenChoice], torch.Tensor, AttentionMetadata]:
        """The token choices, and the last layer's hidden states of the rows still there at the end (every prefill
        row is) with their metadata."""
        model, device = self.model, input_ids.device
        depth = model.loaded_layers
        seqs = [item.seq for item in batch]
        choices: list[TokenChoice | None] = [None] * len(batch)
        current = list(range(len(batch)))  # current[i] = original index of the i-th sequence in `meta`
        frozen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (hidden, positions, slots) that left
        hidden = model.embed(input_ids, positions)
        for index in range(depth):
            layer = index + 1
            if frozen is not None:
                f_hidden, f_pos, f_slots = frozen
                model.fill_kv(index, f_hidden, f_pos, self.kv_layers[index], f_slots)
            if current:
                hidden = model.layer(index, hidden, positions, self.kv_layers[index], meta)
            if layer not in self.exits or not current:
                continue
            final = layer == depth
            qsl = meta.query_start_loc_host
            undecided = [i for i, s in enumerate(current) if choices[s] is None]
            if not undecided:
                continue
            last_rows = torch.tensor([qsl[i + 1] - 1 for i in undecided], dtype=torch.int64, device=device)
            decided = self._decide(hidden[last_rows], [seqs[current[i]] for i in undecided], layer, final)
            for i, choice in zip(undecided, decided, strict=True):
                if choice is not None:
                    choices[current[i]] = choice
            # decode rows that left stop computing; prefill rows stay (their K/V need every layer anyway)
            keep = [i >= meta.num_paged_seqs or choices[current[i]] is None for i in range(len(current))]
            if final or all(keep):
                continue
            gone = torch.tensor([i for i, k in enumerate(keep) if not k], dtype=torch.int64, device=device)
            leaving = (hidden[gone], positions[gone], meta.slot_mapping[gone])
            # concatenated once here, when rows leave, not in every deeper layer
            frozen = leaving if frozen is None else tuple(torch.cat(pair) for pair in zip(frozen, leaving, strict=True))
            rows = torch.tensor([r for r, k in enumerate(self._row_keep(keep, meta)) if k], dtype=torch.int64,
                                device=device)
            hidden, positions = hidden[rows], positions[rows]
            meta = drop_paged_rows(meta, keep, device)
            current = [s for s, k in zip(current, keep, strict=True) if k]
        return choices, hidden, meta  # every choice is set: the last loaded layer decides all that remain

    @staticmethod
    def _row_keep(keep: list[bool], meta: AttentionMetadata) -> list[bool]:
        """Per token row: paged rows follow their sequence's flag; dense (prefill) rows always stay."""
        paged = meta.num_paged_seqs
        return keep[:paged] + [True] * (meta.query_start_loc_host[-1] - paged)
