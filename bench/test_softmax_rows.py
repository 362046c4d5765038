"""Exit-tuning softmax-row ops (helios._C, one fused pass per row) vs the torch op chains they replace.

CPU:  python -m pytest bench/test_softmax_rows.py --benchmark-json=bench/results/softmax_rows-cpu.json
Groups are (op, rows × vocab); the torch reference is each group's baseline. Every timed call starts from a
fresh copy of the logits (the ops work in place); the copy is timed on both sides.
"""

from __future__ import annotations

import pytest
import torch

from helios._ext import extension_available
from helios.ops.softmax_rows import distill_rows_, distill_rows_reference, softmax_rows_, softmax_rows_reference

pytestmark = pytest.mark.skipif(not extension_available(), reason="needs helios._C")
VOCAB = 49152  # SmolLM2


@pytest.fixture(scope="module", params=[256, 1024])
def rows(request):
    g = torch.Generator().manual_seed(0)
    n = request.param
    logits = torch.randn(n, VOCAB, generator=g) * 3
    probs = torch.softmax(torch.randn(n, VOCAB, generator=g) * 3, dim=-1)
    target = probs.argmax(-1)
    return logits, probs, target


def timed(benchmark, fn):
    return benchmark.pedantic(fn, rounds=8, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_softmax_rows(benchmark, rows, impl):
    logits = rows[0]
    benchmark.group = f"softmax_rows_ {logits.shape[0]}x{VOCAB}"
    fn = softmax_rows_reference if impl == "torch" else softmax_rows_
    _, argmax = timed(benchmark, lambda: fn(logits.clone()))
    assert torch.equal(argmax, logits.argmax(-1))


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_distill_rows(benchmark, rows, impl):
    logits, probs, target = rows
    benchmark.group = f"distill_rows_ {logits.shape[0]}x{VOCAB}"
    fn = distill_rows_reference if impl == "torch" else distill_rows_
    cross, _, _ = timed(benchmark, lambda: fn(logits.clone(), probs, target, 1.0, 1.0 / len(target), True))
    want = -(probs * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(cross, want, rtol=1e-4, atol=1e-3)
