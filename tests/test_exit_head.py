"""helios.ops.exit_head (native and Triton under the interpreter) vs a float64 reference on odd shapes."""

from __future__ import annotations

import pytest
import torch

from helios.ops.exit_head import exit_head


def reference(hidden, lm_head, weight, bias, norm, eps):
    h = hidden.double()
    if norm == "rms":
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    elif norm == "layer":
        h = torch.nn.functional.layer_norm(h, (h.shape[1],), weight.double(),
                                           None if bias is None else bias.double(), eps)
    logits = h @ lm_head.double().t()
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    entropy = -(probs * logits.log_softmax(-1)).sum(-1)
    return top.indices[:, 0], top.values[:, 0], top.values[:, 1], entropy


def inputs(rows, dim, vocab, norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g) * 2
    lm_head = torch.randn(vocab, dim, generator=g) / dim**0.5 * 3  # peaked enough to have clear winners
    weight = 1 + 0.1 * torch.randn(dim, generator=g)
    bias = 0.1 * torch.randn(dim, generator=g) if norm == "layer" else None
    return hidden, lm_head, weight, bias


def check(got, want):
    token, p1, p2, entropy = got
    assert token.dtype == torch.int64 and p1.dtype == p2.dtype == entropy.dtype == torch.float32
    assert torch.equal(token, want[0])
    for name, a, b in zip(("p1", "p2", "entropy"), got[1:], want[1:], strict=True):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


SHAPES = [(1, 40, 300), (5, 72, 1000), (17, 96, 777), (33, 40, 513)]


@pytest.mark.parametrize("norm", ["rms", "layer", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_native_matches_float64_reference(shape, norm):
    hidden, lm_head, weight, bias = inputs(*shape, norm)
    got = exit_head(hidden, lm_head, weight, bias, norm=norm, eps=1e-5, backend="native")
    check(got, reference(hidden, lm_head, weight, bias, norm, 1e-5))


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_interpreter_matches_float64_reference(shape, norm):
    pytest.importorskip("triton")
    hidden, lm_head, weight, bias = inputs(*shape, norm)
    got = exit_head(hidden, lm_head, weight, bias, norm=norm, eps=1e-5, backend="triton")
    check(got, reference(hidden, lm_head, weight, bias, norm, 1e-5))


def test_native_chunks_smaller_than_vocab_keep_lowest_index_on_ties():
    from helios.ops.exit_head import PackedHead, exit_head_native

    lm_head = torch.zeros(10, 4)
    lm_head[3] = lm_head[8] = torch.tensor([1.0, 0, 0, 0])  # tied best rows in two different chunks
    hidden = torch.tensor([[2.0, 0, 0, 0]])
    token, p1, p2, _ = exit_head_native(hidden, PackedHead(lm_head, chunk=4), None)
    assert token.item() == 3 and p1.item() == pytest.approx(p2.item())


def test_bad_arguments():
    with pytest.raises(ValueError, match="hidden"):
        exit_head(torch.zeros(3), torch.zeros(5, 3), None)
    with pytest.raises(ValueError, match="norm"):
        exit_head(torch.zeros(1, 3), torch.zeros(5, 3), None, norm="batch")
    with pytest.raises(ValueError, match="backend"):
        exit_head(torch.zeros(1, 3), torch.zeros(5, 3), None, norm="none", backend="cuda")
