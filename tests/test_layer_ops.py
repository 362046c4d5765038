"""helios._C decoder-layer ops (rms_norm, rotary_embedding, silu_and_mul) vs their torch references and a float64
oracle, on odd shapes and strided views, every dtype; the fused residual linear; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helios._ext import load_extension
from helios.ops.layer_ops import LayerOps, rotary_reference, silu_and_mul_reference
from helios.ops.linear import Linear
from helios.ops.norm import rms_norm

load_extension()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# max |fused - float64 oracle| relative to the values' scale, per dtype (fp32: arithmetic order only)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
FUSED, NATIVE = LayerOps(torch.device("cpu"), "fused"), LayerOps(torch.device("cpu"), "native")


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (7, 33), (3, 5, 64)])
def test_rms_norm_matches_reference(dtype, shape):
    x, w = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype, seed=1)
    got = FUSED.rms_norm(x, w, 1e-5)
    x64 = x.double()
    oracle = w.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    assert (got.double() - oracle).abs().max() <= TOLERANCE[dtype] * oracle.abs().max()
    # against the torch reference: the same roundings, so 16-bit results differ by at most one unit in the last place
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    ref = rms_norm(x, w, 1e-5)
    assert ((got.double() - ref.double()).abs() <= ulp * ref.double().abs() + 1e-6).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 6), (2, 1, 130)])
def test_rotary_matches_reference_on_strided_views(dtype, heads, kv_heads, dim):
    tokens, max_pos = 5, 40
    # q and k as the model makes them: views into one fused qkv projection (token stride = the qkv width)
    qkv = randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim: (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * (0.7 ** torch.arange(dim // 2))[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    positions = torch.tensor([0, 39, 7, 7, 21])
    want_q, want_k = rotary_reference(q.double(), k.double(), positions, cos.double(), sin.double())
    ref_q, ref_k = rotary_reference(q, k, positions, cos, sin)
    v_before = qkv[:, (heads + kv_heads) * dim:].clone()
    got_q, got_k = FUSED.rotary(q, k, positions, cos, sin)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    for got, want, ref in ((got_q, want_q, ref_q), (got_k, want_k, ref_k)):
        assert (got.double() - want).abs().max() <= TOLERANCE[dtype] * want.abs().max()
        assert (got.double() - ref.double()).abs().max() <= TOLERANCE[dtype] * want.abs().max()
    assert torch.equal(qkv[:, (heads + kv_heads) * dim:], v_before)  # the values beside them are untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3072), (6, 18), (2, 3, 10), (5, 74)])  # 74: two vectors + a tail
def test_silu_and_mul_matches_reference(dtype, shape):
    x = randn(*shape, dtype=dtype) * 3
    got = FUSED.silu_and_mul(x)
    gate, up = x.double().chunk(2, dim=-1)
    oracle = F.silu(gate) * up
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    assert (got.double() - oracle).abs().max() <= TOLERANCE[dtype] * oracle.abs().max()
    ref = silu_and_mul_reference(x)
    assert (got.double() - ref.double()).abs().max() <= TOLERANCE[dtype] * oracle.abs().max()


def test_native_backend_is_the_reference():
    x, w = randn(3, 8), randn(8, seed=1)
    assert torch.equal(NATIVE.rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6))
    assert torch.equal(NATIVE.silu_and_mul(x), silu_and_mul_reference(x))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_add_fuses_the_residual(bias):
    weight, x, residual = randn(11, 20), randn(3, 20, seed=1), randn(3, 11, seed=2)
    b = randn(11, seed=3) if bias else None
    want = x.double() @ weight.double().T + residual.double() + (b.double() if bias else 0)
    for linear in (Linear(weight, b), Linear(weight.double(), b.double() if bias else None)):
        dtype = linear.weight.dtype if linear.weight is not None else torch.float32
        got = linear.add(x.to(dtype), residual.to(dtype))
        assert (got.double() - want).abs().max() < 1e-4


def test_bad_input_is_named():
    with pytest.raises(RuntimeError, match="rms_norm: weight must be contiguous"):
        FUSED.rms_norm(randn(2, 8), randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="silu_and_mul: the last dimension must be even"):
        FUSED.silu_and_mul(randn(2, 7))
    q, k = randn(2, 2, 4), randn(2, 1, 4)
    cos = randn(8, 4)
    with pytest.raises(RuntimeError, match="position 8 outside"):
        FUSED.rotary(q, k, torch.tensor([0, 8]), cos, cos)
    with pytest.raises(RuntimeError, match="share a dtype"):
        FUSED.rotary(q, k.double(), torch.tensor([0, 1]), cos, cos)
    with pytest.raises(ValueError, match="CPU only"):
        LayerOps(torch.device("cuda"), "fused")


def test_opcheck():
    """Schemas, fake kernels and mutation annotations agree with the kernels (what torch.compile relies on)."""
    x, w = randn(3, 16), randn(16, seed=1)
    torch.library.opcheck(torch.ops.helios.rms_norm, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.helios.silu_and_mul, (x,))
    q, k, cos = randn(3, 2, 8), randn(3, 1, 8), randn(10, 8)
    torch.library.opcheck(torch.ops.helios.rotary_embedding, (torch.tensor([1, 2, 9]), q, k, cos, cos.clone()))
