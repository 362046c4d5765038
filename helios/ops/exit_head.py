"""Fused exit head: norm → shared LM head → (argmax token, p1, p2, entropy), without [B, vocab] logits.

For row h: z = norm(h)·Wᵀ over the vocabulary; p = softmax(z). Returns the argmax token, its probability
p1, the second-highest probability p2, and the entropy H = −Σ p log p (nats).

Online over vocabulary chunks (Milakov & Gimelshein, arXiv 1805.02867): keep the running max m, the
running sums d = Σ e^(z−m) and s = Σ (z−m)·e^(z−m), plus the top-2 logits; then p1 = e^(z1−m)/d,
p2 = e^(z2−m)/d and H = log d − s/d. (When m grows to m', s becomes e^(m−m')·(s + (m−m')·d).)

backends: "native" (the torch reference, and the path where helios._C's fused CPU head does not apply: chunked
over the vocabulary; the engine's CPU path is PackedHead.stats, helios._C's head_stats),
"triton" (the kernel in helios.kernels.exit_head; on CPU tensors it runs under TRITON_INTERPRET=1).
backend=None picks triton on CUDA and native elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helios.ops.linear import Linear, plain_linear_supported
from helios.ops.norm import Norm
from helios.ops.quant import QuantizedLinear, rounds_activations

# vocabulary rows per chunk: [B, 32768] fp32 transient instead of [B, vocab]. Larger chunks were never slower on
# 2 CPU cores (Gemma 3's 262k head, batch 16: 58 ms per head pass at 32768 rows vs 67 ms at 8192; SmolLM2's 49k:
# equal), and the per-chunk bookkeeping is paid fewer times.
CHUNK = 32768


class PackedHead:
    """The LM head prepared for fast matmuls. On CPU in float32: the plain [vocab, d] weight, which helios._C reads
    both for full logits (vocabulary chunks through its linear kernel, no copy) and for the fused statistics
    (`stats`: token, p1, p2, entropy without [B, vocab] logits). Quantized models: int8 tiles (the head is the
    largest single matrix of a small model, and int8 keeps greedy choices where int4 would move them). Elsewhere:
    vocabulary chunks prepared by Linear (oneDNN-packed where it applies)."""

    def __init__(self, lm_head: torch.Tensor, chunk: int = CHUNK, quantization: str | None = None):
        self.vocab_size = lm_head.shape[0]
        self.weight: torch.Tensor | None = None  # plain float32 [vocab, d], read by helios._C (CPU)
        self.quantized: QuantizedLinear | None = None  # the whole head as int8
        if quantization is not None:  # int8 weights; w8a8 / w4a8 models round the head's rows as their layers do
            self.quantized = QuantizedLinear(lm_head, None, "w8a8" if rounds_activations(quantization) else "int8")
            self.chunks = [(0, self.quantized)]
            return
        if plain_linear_supported(lm_head):
            self.weight = lm_head.contiguous()
            lm_head = self.weight
        plain = self.weight is not None
        self.chunks = [(start, Linear(lm_head[start:start + chunk], plain=plain))
                       for start in range(0, self.vocab_size, chunk)]

    @property
    def nbytes(self) -> int:
        """Bytes of the head's own prepared copy (0 when the chunks are views of the plain tensor)."""
        if self.quantized is not None:
            return self.quantized.nbytes
        return sum(linear.out_features * linear.in_features * linear.packed.element_size()
                   for _, linear in self.chunks if linear.packed is not None)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full logits [B, vocab] (plain decoding and sampling need them)."""
        return torch.cat([linear(x) for _, linear in self.chunks], dim=-1)

    def stats(self, x: torch.Tensor):
        """(token, p1, p2, entropy) per row of x [B, d] from helios._C's fused head (CPU: float32 or int8 weights),
        or None where it does not apply (exit_head_native is then the way, and the reference either way)."""
        if self.weight is not None and x.dtype == torch.float32:
            return torch.ops.helios.head_stats(x.contiguous(), self.weight)
        if self.quantized is not None and self.quantized.weight_format == "int8":
            return torch.ops.helios.int8_head_stats(x.float().contiguous(), *self.quantized.parts, self.vocab_size,
                                                    self.quantized.round_activations)
        return None


def _normalize(hidden: torch.Tensor, norm: Norm | None) -> torch.Tensor:
    return norm(hidden) if norm is not None else hidden


def exit_head_native(hidden: torch.Tensor, head: PackedHead | torch.Tensor, norm: Norm | None):
    """hidden [B, d] → (token int64[B], p1 f32[B], p2 f32[B], entropy f32[B]); chunked online softmax."""
    if isinstance(head, torch.Tensor):
        head = PackedHead(head)
    x = _normalize(hidden, norm)
    rows = x.shape[0]
    m = torch.full((rows,), float("-inf"), device=x.device)
    d = torch.zeros(rows, device=x.device)
    s = torch.zeros(rows, device=x.device)
    top1 = torch.full((rows,), float("-inf"), device=x.device)
    top2 = torch.full((rows,), float("-inf"), device=x.device)
    token = torch.zeros(rows, dtype=torch.int64, device=x.device)
    for start, linear in head.chunks:
        z = linear(x).float()  # [B, chunk]
        v1, i1 = z.max(dim=1)  # on ties the lowest index, like argmax (topk's order among equal values is not)
        v2 = z.topk(2, dim=1).values[:, 1] if z.shape[1] > 1 else torch.full_like(v1, float("-inf"))
        better = v1 > top1  # strict: ties keep the lower token id, like argmax
        top2 = torch.where(better, torch.maximum(top1, v2), torch.maximum(top2, v1))
        top1 = torch.where(better, v1, top1)
        token = torch.where(better, i1 + start, token)
        m_new = torch.maximum(m, v1)
        shift = m - m_new  # <= 0; -inf on the first chunk, where d = s = 0
        scale = torch.exp(shift)
        s = torch.where(torch.isfinite(shift), scale * (s + shift * d), s)
        d = d * scale
        zs = z.sub_(m_new[:, None])  # in place: z − m'
        e = torch.exp(zs)
        d = d + e.sum(1)
        s = s + torch.linalg.vecdot(zs, e)
        m = m_new
    p1 = torch.exp(top1 - m) / d
    p2 = torch.exp(top2 - m) / d
    entropy = torch.log(d) - s / d
    return token, p1, p2, entropy


def greedy_head_native(hidden: torch.Tensor, head: PackedHead, norm: Norm | None):
    """hidden [B, d] → (argmax token int64[B], its probability f32[B]): what plain greedy decoding needs, chunk by
    chunk from the same logits PackedHead.logits makes (so the same argmax), never [B, vocab] at once."""
    x = _normalize(hidden, norm)
    best = lse = token = None
    for start, linear in head.chunks:
        z = linear(x).float()
        value, index = z.max(dim=1)  # the lowest index on ties, like argmax
        chunk_lse = torch.logsumexp(z, dim=1)
        if best is None:
            best, lse, token = value, chunk_lse, index
            continue
        better = value > best  # strict: an earlier chunk keeps a tie
        token = torch.where(better, index + start, token)
        best = torch.maximum(best, value)
        lse = torch.logaddexp(lse, chunk_lse)
    return token, torch.exp(best - lse)


def exit_head(hidden: torch.Tensor, lm_head: torch.Tensor, norm_weight: torch.Tensor | None,
              norm_bias: torch.Tensor | None = None, *, norm: str = "rms", eps: float = 1e-6,
              backend: str | None = None):
    """Public op: norm="rms" | "layer" (or "none"); see the module docstring for the outputs."""
    if hidden.dim() != 2 or lm_head.dim() != 2 or hidden.shape[1] != lm_head.shape[1]:
        raise ValueError(f"exit_head: hidden [B, d] and lm_head [V, d] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(lm_head.shape)}")
    if norm not in {"rms", "layer", "none"}:
        raise ValueError(f"exit_head: norm must be 'rms', 'layer' or 'none', got {norm!r}")
    if backend is None:
        backend = "triton" if hidden.is_cuda else "native"
    if backend == "triton":
        from helios.kernels.exit_head import exit_head_triton

        return exit_head_triton(hidden, lm_head, norm_weight, norm_bias, norm=norm, eps=eps)
    if backend != "native":
        raise ValueError(f"exit_head: backend must be None, 'native' or 'triton', got {backend!r}")
    norm_op = None if norm == "none" else Norm(norm, norm_weight, norm_bias, eps)
    return exit_head_native(hidden, lm_head, norm_op)


def exit_head_unfused(hidden, lm_head, norm: Norm | None):
    """The plain chain (norm → full logits → softmax → top-2 → entropy): the baseline the benchmark beats."""
    logits = F.linear(_normalize(hidden, norm), lm_head).float()
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    entropy = -(probs * logits.log_softmax(-1)).sum(-1)
    return top.indices[:, 0], top.values[:, 0], top.values[:, 1], entropy
