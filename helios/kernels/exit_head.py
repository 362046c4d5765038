"""Triton fused exit head: norm prologue + LM-head tiles + online softmax/top-2/entropy, no [B, V] logits.

Grid (row blocks, vocabulary splits). Each program normalizes its BLOCK_B rows on the fly (RMS or
LayerNorm statistics in a prologue over d), walks its vocabulary range in BLOCK_V tiles computing
logits with tl.dot over BLOCK_K slices of d, and keeps per row the running max m, d = Σe^(z−m),
s = Σz·e^(z−m) and the top-2 logits (with the argmax index). It writes those six numbers per
(row, split); a tiny torch merge over the splits gives token, p1, p2 and entropy.
Logits: with 16-bit weights the normalized rows are cast to the weight dtype and tl.dot runs on the tensor
cores with float32 accumulation (what norm → bf16 linear does in the model); with float32 weights the dot is
IEEE float32 (not TF32), so the exit head agrees with the float32 model's own logits.
On CPU tensors this runs under the Triton interpreter (TRITON_INTERPRET=1; float32 and float16, no bfloat16),
which is how CI tests it.
A process decides once, when this module is imported, whether the kernel is compiled or interpreted.
"""

from __future__ import annotations

import torch

import helios  # noqa: F401  (sets TRITON_INTERPRET=1 when there is no GPU, before triton loads)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

NORM_NONE, NORM_RMS, NORM_LAYER = 0, 1, 2


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _exit_head_partials(
        h_ptr, w_ptr, nw_ptr, nb_ptr,
        m_out, d_out, s_out, t1_out, i1_out, t2_out,
        B, D, V, eps, tiles_per_split,
        stride_h, stride_w,
        NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HALF_DOT: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_v = tl.program_id(1)
        splits = tl.num_programs(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B

        # prologue: per-row normalization statistics over d
        mean = tl.zeros([BLOCK_B], dtype=tl.float32)
        rstd = tl.full([BLOCK_B], 1.0, dtype=tl.float32)
        if NORM != 0:
            sum1 = tl.zeros([BLOCK_B], dtype=tl.float32)
            sum2 = tl.zeros([BLOCK_B], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                            mask=row_ok[:, None] & (ks[None, :] < D), other=0.0).to(tl.float32)
                sum1 += tl.sum(h, axis=1)
                sum2 += tl.sum(h * h, axis=1)
            if NORM == 1:
                rstd = 1.0 / tl.sqrt(sum2 / D + eps)
            else:
                mean = sum1 / D
                rstd = 1.0 / tl.sqrt(sum2 / D - mean * mean + eps)

        m = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
        dsum = tl.zeros([BLOCK_B], dtype=tl.float32)
        ssum = tl.zeros([BLOCK_B], dtype=tl.float32)
        top1 = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
        top2 = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
        idx1 = tl.zeros([BLOCK_B], dtype=tl.int32)
        for t in range(0, tiles_per_split):
            v0 = (pid_v + t * splits) * BLOCK_V  # tiles interleaved across splits
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            acc = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                if NORM != 0:
                    nw = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                    h = (h - mean[:, None]) * rstd[:, None] * nw[None, :]
                    if HAS_BIAS:
                        h += tl.load(nb_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                w = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None],
                            mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_V]
                if HALF_DOT:
                    acc += tl.dot(h.to(w.dtype), w)
                else:
                    acc += tl.dot(h, w.to(tl.float32), input_precision="ieee")
            z = tl.where(col_ok[None, :], acc, float("-inf"))
            # online softmax statistics
            tile_max = tl.max(z, axis=1)
            m_new = tl.maximum(m, tile_max)
            scale = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])
            dsum = dsum * scale + tl.sum(e, axis=1)
            ssum = ssum * scale + tl.sum(tl.where(col_ok[None, :], z, 0.0) * e, axis=1)
            m = m_new
            # top-2 of the tile, then merge (strict > keeps the lower index on ties)
            v1 = tl.max(z, axis=1)
            i1 = tl.argmax(z, axis=1, tie_break_left=True)
            v2 = tl.max(tl.where(tl.arange(0, BLOCK_V)[None, :] == i1[:, None], float("-inf"), z), axis=1)
            better = v1 > top1
            top2 = tl.where(better, tl.maximum(top1, v2), tl.maximum(top2, v1))
            idx1 = tl.where(better, (i1 + v0).to(tl.int32), idx1)
            top1 = tl.where(better, v1, top1)
        out = rows * splits + pid_v
        tl.store(m_out + out, m, mask=row_ok)
        tl.store(d_out + out, dsum, mask=row_ok)
        tl.store(s_out + out, ssum, mask=row_ok)
        tl.store(t1_out + out, top1, mask=row_ok)
        tl.store(i1_out + out, idx1, mask=row_ok)
        tl.store(t2_out + out, top2, mask=row_ok)


def _merge(m, d, s, t1, i1, t2):
    """Combines per-split partials [B, splits] into token, p1, p2, entropy."""
    m_all = m.max(dim=1).values
    w = torch.exp(m - m_all[:, None])
    w = torch.where(torch.isfinite(m), w, torch.zeros_like(w))  # splits that saw no vocabulary
    dsum = (d * w).sum(1)
    ssum = (s * w).sum(1)
    best = t1.max(dim=1).values
    # lowest token index among the splits holding the best logit (argmax's tie rule)
    holder = torch.where(t1 == best[:, None], i1.long(), torch.full_like(i1.long(), torch.iinfo(torch.int64).max))
    token = holder.min(dim=1).values
    winner = (i1.long() == token[:, None]) & (t1 == best[:, None])
    runner_up = torch.maximum(torch.where(winner, torch.full_like(t1, float("-inf")), t1).max(dim=1).values,
                              torch.where(winner, t2, torch.full_like(t2, float("-inf"))).max(dim=1).values)
    p1 = torch.exp(best - m_all) / dsum
    p2 = torch.exp(runner_up - m_all) / dsum
    entropy = m_all + torch.log(dsum) - ssum / dsum
    return token, p1, p2, entropy


def kernel_mode() -> str:
    """'compiled' (GPU) or 'interpreted' (TRITON_INTERPRET=1 when this module was imported); fixed per process."""
    if triton is None:
        return "unavailable"
    return "compiled" if isinstance(_exit_head_partials, triton.runtime.JITFunction) else "interpreted"


def launch_config(rows: int, vocab: int, block_v: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_B, tiles per split). Row blocks grow with the batch (tensor-core tiles); on a GPU the vocabulary
    is split so that about four programs per multiprocessor stream the LM head at once."""
    block_b = 16 if rows <= 16 else 32 if rows <= 32 else 64
    tiles = triton.cdiv(vocab, block_v)
    if device.type != "cuda":
        return block_b, max(1, tiles // 2)  # interpreter: two splits still exercise the merge
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(tiles, triton.cdiv(programs, triton.cdiv(rows, block_b))))
    return block_b, triton.cdiv(tiles, splits)


def exit_head_triton(hidden: torch.Tensor, lm_head: torch.Tensor, norm_weight, norm_bias=None, *,
                     norm: str = "rms", eps: float = 1e-6, block_v: int = 128, block_k: int = 64,
                     tiles_per_split: int | None = None):
    if triton is None:
        raise ImportError("backend='triton' needs the triton package: `pip install triton`")
    mode = kernel_mode()
    if hidden.device.type == "cpu" and mode != "interpreted":
        raise RuntimeError("Triton runs CPU tensors only in interpreter mode, and this process compiled the kernel "
                           "for the GPU: set TRITON_INTERPRET=1 before importing helios to use it on CPU")
    if hidden.device.type == "cpu" and torch.bfloat16 in (hidden.dtype, lm_head.dtype):
        raise TypeError("the Triton interpreter has no bfloat16 (numpy lacks it): use float32 or float16 on CPU")
    if lm_head.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"exit_head (triton): lm_head must be float32, bfloat16 or float16, got {lm_head.dtype}")
    hidden = hidden.contiguous()
    lm_head = lm_head.contiguous()
    rows, dim = hidden.shape
    vocab = lm_head.shape[0]
    kind = {"none": NORM_NONE, "rms": NORM_RMS, "layer": NORM_LAYER}[norm]
    block_b, default_tiles = launch_config(rows, vocab, block_v, hidden.device)
    tiles_per_split = tiles_per_split or default_tiles
    splits = triton.cdiv(triton.cdiv(vocab, block_v), tiles_per_split)
    shape = (rows, splits)
    m, d, s, t1, t2 = (torch.empty(shape, device=hidden.device, dtype=torch.float32) for _ in range(5))
    idx = torch.empty(shape, device=hidden.device, dtype=torch.int32)
    dummy = hidden.new_zeros(1)
    grid = (triton.cdiv(rows, block_b), splits)
    try:
        _exit_head_partials[grid](
            hidden, lm_head, norm_weight if norm_weight is not None else dummy,
            norm_bias if norm_bias is not None else dummy,
            m, d, s, t1, idx, t2,
            rows, dim, vocab, eps, tiles_per_split,
            hidden.stride(0), lm_head.stride(0),
            NORM=kind, HAS_BIAS=norm_bias is not None and kind == NORM_LAYER, HALF_DOT=lm_head.dtype != torch.float32,
            BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_K=block_k,
        )
    except Exception as e:
        if "outside of the scope of a kernel" in str(e):  # triton.language was compiled-mode already
            raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its library functions are "
                               "compiled-mode: set TRITON_INTERPRET=1 (or import helios) before importing triton"
                               ) from e
        raise
    return _merge(m, d, s, t1, idx, t2)
