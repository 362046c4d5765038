"""Linear (oneDNN pre-packed on CPU when supported, or plain for helios._C's own kernel) vs a float64 reference,
odd shapes; helios._C linear's checks."""

from __future__ import annotations

import pytest
import torch

from helios._ext import load_extension
from helios.ops import linear as layers

load_extension()  # registers torch.ops.helios.*


@pytest.mark.parametrize("m", [1, 3, 16, 33, 130])
@pytest.mark.parametrize("shape", [(7, 5), (96, 40), (300, 48)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("plain", [False, True])
def test_linear_matches_float64_reference(m, shape, with_bias, plain):
    g = torch.Generator().manual_seed(m)
    weight = torch.randn(*shape, generator=g)
    bias = torch.randn(shape[0], generator=g) if with_bias else None
    x = torch.randn(m, shape[1], generator=g)
    want = x.double() @ weight.double().t() + (bias.double() if with_bias else 0)
    linear = layers.Linear(weight, bias, plain=plain)
    assert linear.plain == plain and (linear.packed is None or not plain)
    got = linear(x)
    assert got.shape == (m, shape[0]) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    residual = torch.randn(m, shape[0], generator=g)
    torch.testing.assert_close(linear.add(x, residual).double(), want + residual.double(), atol=1e-5, rtol=1e-5)


# every register-block height (1..6 rows), row tails of the 4-row tiles, K tails of the 8/16-lane vectors, and
# past 48 rows (at::linear)
@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13, 48, 49])
@pytest.mark.parametrize("n,k", [(1, 1), (5, 17), (4, 16), (37, 100), (130, 33)])
def test_helios_linear_kernel_on_odd_shapes(m, n, k):
    g = torch.Generator().manual_seed(1000 * m + n)
    weight, x = torch.randn(n, k, generator=g), torch.randn(2, m, k, generator=g)
    bias, residual = torch.randn(n, generator=g), torch.randn(2, m, n, generator=g)
    want = x.double() @ weight.double().t()
    torch.testing.assert_close(torch.ops.helios.linear(x, weight).double(), want, atol=1e-5, rtol=1e-5)
    got = torch.ops.helios.linear(x, weight, bias, residual)
    assert got.shape == (2, m, n)
    torch.testing.assert_close(got.double(), want + bias.double() + residual.double(), atol=1e-5, rtol=1e-5)


# from 16 rows the kernel runs the batch along the vector lanes (gemm::wide_range): whole and partial vectors of rows,
# one to three vectors per block, output-row blocks of 12 with their tails, K of any length
@pytest.mark.parametrize("m", [16, 17, 31, 32, 33, 47, 48])
@pytest.mark.parametrize("n,k", [(1, 1), (12, 16), (13, 100), (37, 33), (130, 576)])
def test_helios_linear_kernel_on_wide_batches(m, n, k):
    g = torch.Generator().manual_seed(1000 * m + n)
    weight, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    bias, residual = torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    want = x.double() @ weight.double().t()
    torch.testing.assert_close(torch.ops.helios.linear(x, weight).double(), want, atol=1e-4, rtol=1e-5)
    got = torch.ops.helios.linear(x, weight, bias, residual)
    torch.testing.assert_close(got.double(), want + bias.double() + residual.double(), atol=1e-4, rtol=1e-5)


def test_helios_linear_names_bad_input():
    w = torch.randn(6, 8)
    with pytest.raises(RuntimeError, match="x has 7 features, the weight expects 8"):
        torch.ops.helios.linear(torch.randn(2, 7), w)
    with pytest.raises(RuntimeError, match="x and weight must be float32"):
        torch.ops.helios.linear(torch.randn(2, 8, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        torch.ops.helios.linear(torch.randn(2, 6), w.t())
    with pytest.raises(RuntimeError, match=r"bias must be float32 \[6\]"):
        torch.ops.helios.linear(torch.randn(2, 8), w, torch.randn(5))
    with pytest.raises(RuntimeError, match="residual must be float32 with the output's shape"):
        torch.ops.helios.linear(torch.randn(2, 8), w, None, torch.randn(2, 5))


def test_plain_is_refused_where_the_kernel_cannot_run():
    # 16-bit weights keep the oneDNN / F.linear path
    linear = layers.Linear(torch.randn(8, 4).to(torch.bfloat16), plain=True)
    assert not linear.plain


def test_onednn_probe_and_opt_out(monkeypatch):
    weight = torch.randn(8, 4)
    expected = torch.backends.mkldnn.is_available()
    assert layers.onednn_linear_supported(torch.float32) == expected
    assert (layers.Linear(weight).packed is not None) == expected
    monkeypatch.setenv("HELIOS_ONEDNN", "0")
    layers.onednn_linear_supported.cache_clear()
    try:
        plain = layers.Linear(weight)
        assert plain.packed is None and plain.weight is weight
    finally:
        monkeypatch.delenv("HELIOS_ONEDNN")
        layers.onednn_linear_supported.cache_clear()
