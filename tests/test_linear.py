"""Linear (oneDNN pre-packed on CPU when supported) vs a float64 reference, odd shapes."""

from __future__ import annotations

import pytest
import torch

from helios.ops import linear as layers


@pytest.mark.parametrize("m", [1, 3, 16, 33, 130])
@pytest.mark.parametrize("shape", [(7, 5), (96, 40), (300, 48)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_float64_reference(m, shape, with_bias):
    g = torch.Generator().manual_seed(m)
    weight = torch.randn(*shape, generator=g)
    bias = torch.randn(shape[0], generator=g) if with_bias else None
    x = torch.randn(m, shape[1], generator=g)
    want = x.double() @ weight.double().t() + (bias.double() if with_bias else 0)
    got = layers.Linear(weight, bias)(x)
    assert got.shape == (m, shape[0]) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


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
