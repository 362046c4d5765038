"""What every architecture provides to the runner: layer-by-layer forward over the paged cache."""

from __future__ import annotations

import copy

import torch

from helios.ops import AttentionMetadata, PagedAttentionOps
from helios.ops.exit_head import PackedHead
from helios.ops.norm import Norm


class DecoderModel:
    """Layers 1..loaded_layers of a decoder-only LM. Subclasses fill the weights and define the layer math."""

    model_type: str
    total_layers: int
    loaded_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    weight_bytes: int
    num_parameters: int
    final_norm: Norm | None
    lm_head: torch.Tensor  # [vocab, d_head_input], the plain tensor (the Triton exit head reads it)
    head: PackedHead  # the same weights in vocabulary chunks prepared for fast matmuls
    project_out: torch.Tensor | None = None  # OPT-350m style projection between the final norm and the head
    exit_heads = None  # ExitHeads: trained adapters per exit layer (None: the plain logit lens)

    def __init__(self, ops: PagedAttentionOps):
        self.ops = ops

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer(self, index: int, hidden: torch.Tensor, positions: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
              meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm (and any output projection) before the LM head."""
        return self.final_norm(hidden) if self.final_norm is not None else hidden

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed(input_ids, positions)
        for i in range(self.loaded_layers):
            hidden = self.layer(i, hidden, positions, kv_caches[i], meta)
        return hidden

    def _qkv(self, w, hidden: torch.Tensor, positions: torch.Tensor):
        """Layer w's queries, keys and values [tokens, heads, head_dim] (norm, projection, positions applied)."""
        raise NotImplementedError

    def fill_kv(self, index: int, hidden: torch.Tensor, positions: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor], slot_mapping: torch.Tensor) -> None:
        """Hidden-state propagation for rows that left the stack earlier: layer `index` stores K/V computed
        from their exited hidden state (input norm + K/V projections only), so later tokens can attend."""
        _, k, v = self._qkv(self.layers[index], hidden, positions)
        self.ops.store_kv(k, v, kv[0], kv[1], slot_mapping)

    def _attend(self, w, hidden: torch.Tensor, positions: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Layer w's attention up to its output projection: Q/K/V, K/V stored in the cache, paged or dense
        attention (within w.sliding_window); returns [tokens, heads * head_dim]."""
        q, k, v = self._qkv(w, hidden, positions)
        self.ops.store_kv(k, v, kv[0], kv[1], meta.slot_mapping)
        attn = self.ops.attention(q, k, v, kv[0], kv[1], meta, self.scale, w.sliding_window)
        return attn.view(hidden.shape[0], -1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.logits(self.head_input(hidden))

    def _adapt(self, hidden: torch.Tensor, layer: int | None) -> tuple[torch.Tensor, Norm | None]:
        """The exit's adapter (before the norm) and its norm, for the 1-based exit `layer`."""
        adapter = None if self.exit_heads is None or layer is None else self.exit_heads.adapters.get(layer)
        if adapter is None:
            return hidden, self.final_norm
        norm = self.final_norm
        if adapter.norm_weight is not None and norm is not None:
            norm = Norm(norm.kind, adapter.norm_weight, norm.bias, norm.eps)
        return adapter(hidden), norm

    def exit_head_input(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """What the LM head reads at an exit: adapter, the exit's norm, any output projection. Plain torch ops,
        so exit tuning trains adapters through exactly this function."""
        hidden, norm = self._adapt(hidden, layer)
        x = norm(hidden) if norm is not None else hidden
        if self.project_out is not None:
            x = torch.nn.functional.linear(x, self.project_out)
        return x

    def exit_logits(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Full logits at an exit (sampled rows need the whole distribution)."""
        return self.head.logits(self.exit_head_input(hidden, layer))

    def greedy_head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(argmax token, its probability) of each row at the last layer, as compute_logits + argmax would give,
        without writing [batch, vocab] logits."""
        from helios.ops.exit_head import greedy_head_native

        x = self.head_input(hidden)
        stats = self.head.stats(x)
        return (stats[0], stats[1]) if stats is not None else greedy_head_native(x, self.head, None)

    def token_nats(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-ln p(targets[i]) of each row at the last layer (float32 [rows]), as compute_logits + log_softmax would
        give. Where the fused head applies (CPU float32), from its statistics without [rows, vocab] logits: with z1
        the argmax's logit and p1 its probability, the log-normalizer is z1 - ln p1, so -ln p(t) = z1 - z_t - ln p1
        (the two logits are dot products with two head rows)."""
        x = self.head_input(hidden)
        stats = self.head.stats(x) if self.head.weight is not None else None
        if stats is None:
            log_probs = self.head.logits(x).float().log_softmax(-1)
            return -log_probs.gather(1, targets[:, None])[:, 0]
        token, p1 = stats[0], stats[1]
        weight = self.head.weight
        gap = (x.float() * (weight[token] - weight[targets])).sum(-1)  # z1 - z_t
        return gap - p1.clamp_min(1e-45).log()

    def exit_head(self, hidden: torch.Tensor, layer: int | None = None):
        """(token, p1, p2, entropy) of each row at an exit: adapter, then norm + LM head fused, no [B, vocab]
        logits."""
        from helios.ops.exit_head import exit_head, exit_head_native

        if self.project_out is not None or not hidden.is_cuda:
            x = self.exit_head_input(hidden, layer)
            stats = self.head.stats(x)
            return stats if stats is not None else exit_head_native(x, self.head, None)
        hidden, norm = self._adapt(hidden, layer)
        n = norm
        kind = "none" if n is None else n.fused_kind
        return exit_head(hidden, self.lm_head, None if n is None else n.weight, None if n is None else n.bias,
                         norm=kind, eps=1e-5 if n is None else n.eps)

    def exit_head_batch(self, states: dict[int | None, torch.Tensor]) -> dict[int | None, tuple]:
        """exit_head for the rows of several exits at once ({1-based layer, or None for the last layer: hidden
        rows}). On CPU their rows go through the fused head together, so the LM head is read once for all of them
        (profiling probes)."""
        if not states or next(iter(states.values())).is_cuda:
            return {layer: self.exit_head(hidden, layer) for layer, hidden in states.items()}
        inputs = [self.exit_head_input(hidden, layer) for layer, hidden in states.items()]
        stats = self.head.stats(torch.cat(inputs))
        if stats is None:
            return {layer: self.exit_head(hidden, layer) for layer, hidden in states.items()}
        sizes = [len(x) for x in inputs]
        split = [t.split(sizes) for t in stats]
        return {layer: tuple(part[i] for part in split) for i, layer in enumerate(states)}

    def _load_layer(self, reader, index: int):
        """Reads the weights of layer `index` (0-based) through `reader`."""
        raise NotImplementedError

    def _load_layers(self, reader, start: int, end: int) -> list:
        """Reads layers start..end-1 (0-based), recording each one's bytes and parameters (layer_sizes)."""
        layers, sizes = [], []
        for i in range(start, end):
            before, params_before = reader.bytes_loaded, reader.params_loaded
            layers.append(self._load_layer(reader, i))
            sizes.append((reader.bytes_loaded - before, reader.params_loaded - params_before))
        self.layer_sizes = getattr(self, "layer_sizes", [])[:start] + sizes
        return layers

    def grow(self, reader, depth: int) -> None:
        """Loads layers loaded_layers+1..depth (and no others) and appends them; the KV pool is the caller's."""
        if not self.loaded_layers < depth <= self.total_layers:
            raise ValueError(f"cannot grow from {self.loaded_layers} to {depth} layers (the model has "
                             f"{self.total_layers})")
        sizes = list(self.layer_sizes)
        try:
            new = self._load_layers(reader, self.loaded_layers, depth)
        except BaseException:
            self.layer_sizes = sizes
            raise
        self.layers.extend(new)  # only after every new layer loaded: a failure leaves the model as it was
        self.loaded_layers = depth
        added = self.layer_sizes[len(sizes):]
        self.layer_bytes += sum(b for b, _ in added)
        self.weight_bytes += sum(b for b, _ in added)
        self.num_parameters += sum(p for _, p in added)

    def shared(self, reader, depth: int) -> DecoderModel:
        """A model of `depth` layers over this one's tensors: it shares the embedding, the LM head and layers
        1..min(depth, loaded_layers) (nothing copied, nothing read again) and reads only the layers this one lacks
        through `reader`. Exit heads are the new model's own to set."""
        if not 1 <= depth <= self.total_layers:
            raise ValueError(f"depth {depth} is outside 1..{self.total_layers}")
        other = copy.copy(self)
        keep = min(depth, self.loaded_layers)
        dropped = self.layer_sizes[keep:]
        other.layers, other.layer_sizes, other.loaded_layers = list(self.layers[:keep]), self.layer_sizes[:keep], keep
        other.layer_bytes = self.layer_bytes - sum(b for b, _ in dropped)
        other.weight_bytes = self.weight_bytes - sum(b for b, _ in dropped)
        other.num_parameters = self.num_parameters - sum(p for _, p in dropped)
        other.exit_heads = None
        if depth > keep:
            other.grow(reader, depth)
        return other

    def _finish_loading(self, reader, tied: bool) -> None:
        """Loads the LM head (the input embedding when tied), prepares it for matmuls, and records the memory
        and parameters that loading took. Needs self.embed_tokens."""
        if tied:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = reader.checkpoint.get("lm_head.weight", reader.dtype, reader.device)
            if self.lm_head.shape != (self.vocab_size, self.embed_tokens.shape[1]):
                raise ValueError(f"lm_head.weight has shape {tuple(self.lm_head.shape)}, expected "
                                 f"{(self.vocab_size, self.embed_tokens.shape[1])}")
            reader.count(self.lm_head)
        self.head = PackedHead(self.lm_head, quantization=reader.quantization)
        head_bytes = self.lm_head.numel() * self.lm_head.element_size()
        # the head's prepared copy (oneDNN-packed or int8) lives beside the plain tensor, which the embedding (when
        # tied), the exit-head kernels and exit tuning read
        self.weight_bytes = reader.bytes_loaded + self.head.nbytes
        self.num_parameters = reader.params_loaded
        # where the bytes are: the embedding and the LM head (the tied head is the embedding) dominate small models
        self.embedding_bytes = self.embed_tokens.numel() * self.embed_tokens.element_size()
        self.lm_head_bytes = head_bytes
        self.lm_head_tied = tied
        self.layer_bytes = reader.bytes_loaded - self.embedding_bytes - (0 if tied else head_bytes)
