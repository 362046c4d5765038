"""Fused softmax-row ops for exit tuning vs float64 torch references, odd shapes; the hand-written distillation
gradient vs autograd."""

from __future__ import annotations

import pytest
import torch

from helios._ext import load_extension
from helios.ops.softmax_rows import distill_rows_, distill_rows_reference, softmax_rows_, softmax_rows_reference
from helios.tuning.distill import distill, teacher_targets

load_extension()
SHAPES = [(1, 7), (5, 300), (17, 1001), (3, 4099)]


def random_rows(rows, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4
    probs = torch.softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3, dim=-1)
    target = torch.randint(0, vocab, (rows,), generator=g)
    return logits, probs, target


@pytest.mark.parametrize("rows,vocab", SHAPES)
def test_softmax_rows_matches_float64_reference(rows, vocab):
    logits, _, _ = random_rows(rows, vocab, seed=rows)
    want = logits.clone()
    want_neg_entropy, want_argmax = softmax_rows_reference(want)
    got = logits.float().contiguous()
    neg_entropy, argmax = torch.ops.helios.softmax_rows_(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(neg_entropy.double(), want_neg_entropy, rtol=1e-5, atol=1e-5)
    assert torch.equal(argmax, want_argmax)


@pytest.mark.parametrize("rows,vocab", SHAPES)
@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
@pytest.mark.parametrize("write_grad", [True, False])
def test_distill_rows_matches_float64_reference(rows, vocab, ce_weight, write_grad):
    logits, probs, target = random_rows(rows, vocab, seed=vocab)
    want = logits.clone()
    want_stats = distill_rows_reference(want, probs, target, ce_weight, 0.25, write_grad)
    got = logits.float().contiguous()
    stats = torch.ops.helios.distill_rows_(got, probs.float(), target, ce_weight, 0.25, write_grad)
    for value, expected in zip(stats[:2], want_stats[:2], strict=True):
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats[2], want_stats[2])
    torch.testing.assert_close(got.double(), want if write_grad else logits, rtol=1e-5, atol=1e-7)


def test_distill_rows_rejects_bad_targets_and_shapes():
    logits, probs, target = random_rows(4, 50, seed=0)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        torch.ops.helios.distill_rows_(logits.float(), probs.float(), target + 50, 0.0, 1.0, True)
    with pytest.raises(RuntimeError, match="shapes differ"):
        torch.ops.helios.distill_rows_(logits.float(), probs.float()[:3], target, 0.0, 1.0, True)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.helios.softmax_rows_(logits)


def test_opcheck_softmax_row_ops():
    logits, probs, target = random_rows(3, 40, seed=1)
    torch.library.opcheck(torch.ops.helios.softmax_rows_.default, (logits.float(),))
    torch.library.opcheck(torch.ops.helios.distill_rows_.default,
                          (logits.float(), probs.float(), target, 0.5, 0.1, True))


def test_wrappers_fall_back_to_the_reference_for_other_dtypes():
    logits, probs, target = random_rows(3, 40, seed=2)
    want = logits.clone()
    assert torch.equal(softmax_rows_(logits.clone())[1], softmax_rows_reference(want)[1])
    got, want = logits.clone(), logits.clone()
    distill_rows_(got, probs, target, 0.3, 0.5, True)
    distill_rows_reference(want, probs, target, 0.3, 0.5, True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_distill_gradient_equals_autograd(ce_weight):
    """The hand-written head backward == autograd of mean(KL(p‖q) + α·CE(argmax p, q)), in float64."""
    g = torch.Generator().manual_seed(3)
    head = torch.randn(257, 24, generator=g, dtype=torch.float64)
    x_final = torch.randn(37, 24, generator=g, dtype=torch.float64)
    x = torch.randn(37, 24, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = teacher_targets(x_final, head.float())
    result = distill(x.detach().float(), head.float(), teacher, ce_weight, row_chunk=16)

    logp = torch.log_softmax(x_final @ head.T, dim=-1)
    logq = torch.log_softmax(x @ head.T, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    ce = -logq.gather(1, logp.argmax(-1)[:, None]).squeeze(1)
    (kl + ce_weight * ce).mean().backward()
    torch.testing.assert_close(result.grad.double(), x.grad, rtol=1e-4, atol=1e-6)
    assert result.kl == pytest.approx(float(kl.detach().sum()), rel=1e-4)
    assert result.ce == pytest.approx(float(ce.detach().sum()), rel=1e-4)
    assert result.agree == int((logq.argmax(-1) == logp.argmax(-1)).sum())
