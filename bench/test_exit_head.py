"""Fused exit head vs the unfused torch chain (norm → full logits → softmax → top-2 → entropy).

CPU:  python -m pytest bench/test_exit_head.py --benchmark-json=bench/results/exit_head-cpu.json
GPU:  the same on a CUDA machine also times the Triton kernel (interpreted runs are never timed).
Groups are (shape, batch); the unfused chain is each group's baseline.
"""

from __future__ import annotations

import pytest
import torch

from helios.ops.exit_head import PackedHead, exit_head, exit_head_native, exit_head_unfused
from helios.ops.norm import Norm

SHAPES = {"smollm2": (576, 49152), "opt-1.3b": (2048, 50272)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=list(SHAPES))
def head(request):
    dim, vocab = SHAPES[request.param]
    g = torch.Generator().manual_seed(0)
    lm_head = (torch.randn(vocab, dim, generator=g) / dim**0.5 * 4).to(DEVICE)
    norm = Norm("rms", (1 + 0.1 * torch.randn(dim, generator=g)).to(DEVICE), None, 1e-5)
    packed = PackedHead(lm_head) if DEVICE == "cpu" else None
    return request.param, lm_head, norm, packed


def timed(benchmark, fn, *args):
    def call():
        out = fn(*args)
        sync()
        return out

    return benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=3)


@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("impl", ["unfused", "fused"])
def test_exit_head(benchmark, head, batch, impl):
    name, lm_head, norm, packed = head
    hidden = torch.randn(batch, lm_head.shape[1], device=DEVICE) * 2
    benchmark.group = f"exit_head {name} B={batch} {DEVICE}"
    benchmark.extra_info.update(shape=list(lm_head.shape), batch=batch, device=DEVICE,
                                lm_head_bytes=lm_head.numel() * lm_head.element_size())
    want = exit_head_unfused(hidden, lm_head, norm)
    if impl == "unfused":
        got = timed(benchmark, exit_head_unfused, hidden, lm_head, norm)
    elif DEVICE == "cpu":
        got = timed(benchmark, exit_head_native, hidden, packed, norm)
    else:
        got = timed(benchmark, lambda h: exit_head(h, lm_head, norm.weight, norm="rms", eps=norm.eps), hidden)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-3)
