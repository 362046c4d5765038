"""int8/int4 linears (helios._C int8_linear / int4_linear) vs a float64 oracle with the dequantized weight (and,
where the kernel takes integer dot products, the input rounded as it rounds it), on odd shapes, every path (register
blocks of 1-6 rows up to 48 rows, integer dot products from 12 rows with AVX-512 VNNI, slabs beyond), bias and
residual; the
quantizers' round trip; quantized models end to end (parity with the dequantized float model, bytes, KV pool,
truncation and exits); bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helios._ext import load_extension
from helios.ops.exit_head import PackedHead
from helios.ops.quant import (
    QuantizedLinear,
    dequantize_int4,
    dequantize_int8,
    integer_dot_rows,
    quantize_activations,
    quantize_int4,
    quantize_int8,
    quantized_linear_reference,
)

load_extension()
# blocks of up to 3 (AVX2) or 6 (AVX-512) rows and every remainder up to 48 rows, the batch along the vector lanes
# from 8 (AVX2) or 16 (AVX-512) rows (whole and partial vectors), integer dot products from 12 (AVX-512 VNNI), slabs
# beyond
ROWS = [1, 2, 3, 4, 5, 7, 11, 12, 16, 17, 33, 48, 49, 130]


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quantization", ["int8", "int4", "w8a8", "w4a8"])
@pytest.mark.parametrize("out_features,in_features", [(1, 32), (13, 40), (37, 96), (64, 576), (1030, 64)])
@pytest.mark.parametrize("rows", ROWS)
def test_quantized_linear_matches_oracle(quantization, out_features, in_features, rows):
    linear = QuantizedLinear(randn(out_features, in_features), randn(out_features, seed=2), quantization)
    x = randn(rows, in_features, seed=1)
    oracle = quantized_linear_reference(x, linear)
    got = linear(x)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    # float32 sums of in_features products, in another order than float64
    assert (got.double() - oracle).abs().max() <= 1e-5 * (x.abs() @ linear.dequantized().abs().T).max()
    residual = randn(rows, out_features, seed=3)
    assert torch.allclose(linear.add(x, residual), got + residual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_prefill_of_a_weight_larger_than_one_slab(quantization):
    """Prefill dequantizes 8 Mi floats of weight at a time (an LM head is larger): 131,075 x 64 takes two slabs,
    the second one short, its last tile partial; bias and residual land in every slab's columns."""
    linear = QuantizedLinear(randn(131_075, 64), randn(131_075, seed=2), quantization)
    x, residual = randn(49, 64, seed=1), randn(49, 131_075, seed=3)
    oracle = quantized_linear_reference(x, linear)
    got = linear.add(x, residual)
    assert got.shape == (49, 131_075)
    bound = 1e-5 * (x.abs() @ linear.dequantized().abs().T).max()
    assert (got.double() - residual.double() - oracle).abs().max() <= bound


@pytest.mark.parametrize("bits,levels", [(8, 127), (16, 32639)])
def test_activations_round_per_group_of_32(bits, levels):
    x = randn(5, 70) * torch.logspace(-3, 3, 70)  # groups of very different ranges; 70: a zero-padded last group
    x[1] = 0.0
    got = quantize_activations(x, bits)
    groups = F.pad(x.double(), (0, 26)).reshape(5, 3, 32)
    scale = (groups.abs().amax(-1, keepdim=True) / levels).float().double()
    q = F.pad(got, (0, 26)).reshape(5, 3, 32) / torch.where(scale > 0, scale, 1.0)
    assert torch.allclose(q, q.round(), atol=1e-9) and q.abs().max() <= levels  # integers times the group's scale
    half_step = (scale / 2).expand(-1, -1, 32).reshape(5, 96)[:, :70]
    assert ((got - x.double()).abs() <= half_step * (1 + 1e-6)).all()
    assert (got[1] == 0).all()


@pytest.mark.skipif(integer_dot_rows() == 0, reason="this build has no integer dot products (AVX-512 VNNI)")
@pytest.mark.parametrize("quantization", ["int8", "int4", "w8a8", "w4a8"])
def test_integer_dot_products_take_the_rounded_input_from_integer_dot_rows_to_48(quantization):
    """From integer_dot_rows() to 48 rows the kernel multiplies the input rounded per group (w8a8 / w4a8: to int8,
    int8 / int4: to int16); it matches that oracle to float32 rounding and is measurably away from the unrounded
    product (so the path ran); below it and past 48 rows the input is used as is."""
    linear = QuantizedLinear(randn(200, 96), None, quantization)
    weight = linear.dequantized().double()
    bits = 8 if quantization in ("w8a8", "w4a8") else 16
    for rows in (integer_dot_rows() - 1, integer_dot_rows(), 48, 49):
        x = randn(rows, 96, seed=rows)
        x[:, ::32] *= 30  # one large value per group: a coarse grid for the others, so int16 rounding shows too
        got = linear(x).double()
        bound = 1e-6 * (x.double().abs() @ weight.abs().T).max()  # float32 sums; int16 rounding moves ~3e-5
        rounded, exact = F.linear(quantize_activations(x, bits), weight), F.linear(x.double(), weight)
        integer = integer_dot_rows() <= rows <= 48
        assert (got - (rounded if integer else exact)).abs().max() <= bound, rows
        assert ((got - exact).abs().max() > 10 * bound) == integer, rows


@pytest.mark.skipif(integer_dot_rows() == 0, reason="this build has no integer dot products (AVX-512 VNNI)")
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_int16_activations_split_exactly_into_their_int8_halves(quantization):
    """The kernel multiplies q = 256 * hi + lo as two int8 dot products: values at the edges of the halves (lo at
    -128 / 127, hi at -127 / 127, q at +-32639) give the oracle's product, each one alone in its row."""
    edges = torch.tensor([32639, -32639, 127, 128, -128, -129, 255, 256, -256, -257, 32512, -32512, 32511, 1, -1, 0])
    linear = QuantizedLinear(randn(40, 64), None, quantization)
    rows = max(integer_dot_rows(), len(edges))
    x = torch.zeros(rows, 64)
    x[:, 0] = 32639.0  # every group's largest value: scale 1, q = x
    x[:, 32] = -32639.0
    x[: len(edges), 5] = edges.float()
    x[: len(edges), 40] = -edges.flip(0).float()
    got, oracle = linear(x).double(), quantized_linear_reference(x, linear)
    assert torch.equal(quantize_activations(x, 16), x.double())  # the values lie on the grid
    bound = 1e-6 * (x.double().abs() @ linear.dequantized().double().abs().T).max()
    assert (got - oracle).abs().max() <= bound


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_leading_dimensions_and_16_bit_inputs(quantization):
    linear = QuantizedLinear(randn(24, 64), None, quantization)
    x = randn(2, 5, 64)
    want = quantized_linear_reference(x.reshape(10, 64), linear).reshape(2, 5, 24)
    assert torch.allclose(linear(x).double(), want, atol=1e-4)
    x16 = x.bfloat16()
    got = linear(x16)  # computed in float32, rounded once to bfloat16
    want16 = quantized_linear_reference(x16.float().reshape(10, 64), linear).reshape(2, 5, 24)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.double(), want16, rtol=2**-8, atol=1e-4)


def test_int8_round_trip_error_is_at_most_half_a_min_max_step_per_group():
    w = randn(50, 70) * torch.linspace(0.01, 10, 50)[:, None]  # rows of very different scales
    q, scale, minimum = quantize_int8(w)
    full = dequantize_int8(q, scale, minimum)
    back = F.pad(w, (0, 26, 0, 2)).reshape(52, 3, 32)  # padded to 96 columns, 13 tiles of 4 rows
    step = (back.amax(-1) - back.amin(-1)) / 255
    # per group the quantizer keeps the better grid, so the squared error is at most min/max rounding's
    err = (full.reshape(52, 3, 32) - back).square().sum(-1)
    assert (err <= 32 * (step / 2).square() * (1 + 1e-4) + 1e-12).all()
    assert (full[:50, :70] - w).abs().max() <= (step.amax() / 2) * 2  # never worse than one step anywhere
    assert (full[50:] == 0).all()  # padded rows; padded columns meet the zero-padded input, any value will do
    assert q.dtype == torch.uint8 and q.shape == (13, 3, 4, 32) and scale.shape == minimum.shape == (13, 3, 4)


def _q4_1_blocks(rows: int, cols: int) -> torch.Tensor:
    """Weights on llama.cpp Q4_1 grids: per block of 32, q in 0..15 (both ends used) times d plus m."""
    q = torch.randint(0, 16, (rows, cols // 32, 32), generator=torch.Generator().manual_seed(7)).float()
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(rows, cols // 32, 1, generator=torch.Generator().manual_seed(8)) * 0.1 + 1e-3
    m = randn(rows, cols // 32, 1, seed=9) * 0.1
    return (q * d + m).reshape(rows, cols)


def _q8_0_blocks(rows: int, cols: int) -> torch.Tensor:
    """Weights on llama.cpp Q8_0 grids: per block of 32, q in -127..127 (amax at ±127) times d."""
    q = torch.randint(-127, 128, (rows, cols // 32, 32), generator=torch.Generator().manual_seed(7)).float()
    q[..., 0] = torch.where(torch.arange(rows * (cols // 32)).reshape(rows, -1) % 2 == 0, 127.0, -127.0)
    q[..., 1:].clamp_(-126, 126)
    d = torch.rand(rows, cols // 32, 1, generator=torch.Generator().manual_seed(8)) * 0.01 + 1e-4
    return (q * d).reshape(rows, cols)


@pytest.mark.parametrize("source", ["q4_1", "q8_0"])
def test_int8_holds_llama_cpp_q4_1_and_q8_0_blocks_exactly(source):
    """A GGUF that ships quantized is served with its own weights, not a re-rounded copy (up to float32 rounding
    of scale and minimum)."""
    w = _q4_1_blocks(12, 96) if source == "q4_1" else _q8_0_blocks(12, 96)
    back = dequantize_int8(*quantize_int8(w))
    step = (w.reshape(12, 3, 32).amax(-1) - w.reshape(12, 3, 32).amin(-1)).amax()
    assert (back - w).abs().max() <= step * 1e-5
    if source == "q8_0":  # a min/max grid alone would re-round these (255 steps over a range of 254)
        low, high = w.reshape(12, 3, 32).amin(-1), w.reshape(12, 3, 32).amax(-1)
        q = torch.round((w.reshape(12, 3, 32) - low[..., None]) / ((high - low) / 255)[..., None])
        minmax = (q * ((high - low) / 255)[..., None] + low[..., None]).reshape(12, 96)
        assert (minmax - w).abs().max() > step * 1e-3


def test_int4_holds_llama_cpp_q4_1_blocks_exactly():
    w = _q4_1_blocks(12, 96)
    back = dequantize_int4(*quantize_int4(w))
    assert (back - w).abs().max() <= w.abs().max() * 1e-5


def test_int4_round_trip_error_is_half_a_step_per_group():
    w = randn(9, 96)
    w[3, :32] = 5.0  # a constant group: scale 0, reconstructed exactly
    packed, scale, minimum = quantize_int4(w)
    back = dequantize_int4(packed, scale, minimum)[:9]
    groups = w.reshape(9, 3, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    assert ((back - w).reshape(9, 3, 32).abs() <= step[..., None] / 2 + 1e-6).all()
    assert (back[3, :32] == 5.0).all()
    assert packed.dtype == torch.uint8 and packed.shape == (3, 3, 4, 16)  # 9 rows -> 3 tiles of 4


def test_quantized_head_keeps_the_argmax_of_its_own_logits():
    lm_head = randn(70000, 64)  # three vocabulary chunks
    head = PackedHead(lm_head, quantization="int4")  # the head is int8 in both modes
    x = randn(3, 64, seed=5)
    logits = head.logits(x)
    want = F.linear(x.double(), torch.cat([linear.dequantized() for _, linear in head.chunks]).double())
    assert torch.allclose(logits.double(), want, atol=1e-3)
    assert head.nbytes <= lm_head.numel() * lm_head.element_size() * 1.25 / 4  # 1.25 bytes per weight


def test_bad_input_names_the_problem():
    linear = QuantizedLinear(randn(8, 64), None, "int8")
    with pytest.raises(RuntimeError, match="features"):
        linear(randn(2, 30))
    with pytest.raises(RuntimeError, match="residual"):
        linear.add(randn(2, 64), randn(3, 8))
    with pytest.raises(ValueError, match="quantization must be one of"):
        QuantizedLinear(randn(8, 64), None, "int3")
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.helios.int8_linear(randn(2, 64).double(), *linear.parts, 8, None, None)
    with pytest.raises(RuntimeError, match="out_features"):
        torch.ops.helios.int8_linear(randn(2, 64), *linear.parts, 9, None, None)


@pytest.mark.parametrize("quantization", ["int8", "int4", "w8a8"])
def test_opcheck(quantization):
    linear = QuantizedLinear(randn(12, 64), randn(12), quantization)
    op = torch.ops.helios.int8_linear if linear.weight_format == "int8" else torch.ops.helios.int4_linear
    rows = 20 if linear.round_activations else 3
    torch.library.opcheck(op, (randn(rows, 64), *linear.parts, 12, linear.bias, randn(rows, 12),
                               linear.round_activations))


# ---- quantized models end to end ------------------------------------------------------------------------------
def _dequantized_twin(quantized, plain) -> None:
    """Gives the float engine `plain` exactly the weights `quantized` multiplies by (dequantized), so the two must
    produce the same tokens: the quantized model's oracle."""
    from dataclasses import fields

    from helios.ops.linear import Linear

    qm, fm = quantized.engine.model, plain.engine.model
    for q_layer, f_layer in zip(qm.layers, fm.layers, strict=True):
        for field in fields(q_layer):
            linear = getattr(q_layer, field.name)
            if isinstance(linear, QuantizedLinear):
                setattr(f_layer, field.name, Linear(linear.dequantized(), linear.bias))
    fm.head = PackedHead(torch.cat([linear.dequantized() for _, linear in qm.head.chunks]))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "opt"])
def test_quantized_model_equals_its_dequantized_float_twin(checkpoints, kind, quantization):
    from helios import LLM, SamplingParams
    from tests.conftest import PROMPTS

    quantized = LLM(checkpoints[kind], dtype="float32", quantization=quantization, kv_cache_blocks=256)
    plain = LLM(checkpoints[kind], dtype="float32", kv_cache_blocks=256)
    _dequantized_twin(quantized, plain)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in quantized.generate(PROMPTS, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, params, use_tqdm=False)]
    assert got == want
    assert all(isinstance(linear, QuantizedLinear) for _, linear in quantized.engine.model.head.chunks)


def test_quantized_weights_leave_more_kv_blocks_and_truncation_and_exits_work(peaked_checkpoints, monkeypatch):
    from helios import LLM, SamplingParams
    from helios.exits import ExitConfig

    path = peaked_checkpoints["llama"]
    budget = 3 * 2**20
    sizes = {q: LLM(path, dtype="float32", memory_budget=budget, max_num_seqs=4, max_num_batched_tokens=64,
                    quantization=q).stats() for q in (None, "int8", "int4")}
    assert sizes["int4"]["weight_bytes"] < sizes["int8"]["weight_bytes"] < sizes[None]["weight_bytes"]
    assert sizes["int4"]["kv_blocks_total"] > sizes["int8"]["kv_blocks_total"] > sizes[None]["kv_blocks_total"]

    from helios.model.checkpoint import Checkpoint

    read = []
    original = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name, *a: read.append(name) or original(self, name, *a))
    config = ExitConfig(layers="all", threshold=0.5)
    truncated = LLM(path, dtype="float32", num_layers=3, quantization="int8", early_exit=config, kv_cache_blocks=64)
    assert not any(".layers.3." in name for name in read)
    twin = LLM(path, dtype="float32", num_layers=3, early_exit=config, kv_cache_blocks=64)
    _dequantized_twin(truncated, twin)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = truncated.generate(["The quick brown fox", "Water boils at"], params, use_tqdm=False)
    want = twin.generate(["The quick brown fox", "Water boils at"], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    histogram = truncated.stats()["exit_histogram"]
    assert sum(histogram.values()) > 0 and set(histogram) - {3}, histogram  # some tokens left before layer 3


def test_quantization_argument_is_checked(checkpoints):
    from helios import LLM

    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(checkpoints["llama"], quantization="fp8")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU only"):
            LLM(checkpoints["llama"], device="cuda", quantization="int8")
