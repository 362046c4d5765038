"""Weight-only int8/int4 linears (helios._C int8_linear / int4_linear) vs a float64 oracle with the dequantized
weight, on odd shapes, every path (register, tile, slab: 1-3, 4-48, > 48 rows), bias and residual; the quantizers'
round trip; quantized models end to end (parity with the dequantized float model, bytes, KV pool, truncation and
exits); bad input."""

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
    quantize_int4,
    quantize_int8,
    quantized_linear_reference,
)

load_extension()
ROWS = [1, 2, 3, 4, 7, 48, 49, 130]  # register path up to 3, tile path up to 48, slab path beyond


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
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
def test_leading_dimensions_and_16_bit_inputs(quantization):
    linear = QuantizedLinear(randn(24, 64), None, quantization)
    x = randn(2, 5, 64)
    want = quantized_linear_reference(x.reshape(10, 64), linear).reshape(2, 5, 24)
    assert torch.allclose(linear(x).double(), want, atol=1e-4)
    x16 = x.bfloat16()
    got = linear(x16)  # computed in float32, rounded once to bfloat16
    want16 = quantized_linear_reference(x16.float().reshape(10, 64), linear).reshape(2, 5, 24)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.double(), want16, rtol=2**-8, atol=1e-4)


def test_int8_round_trip_error_is_half_a_step_per_row():
    w = randn(50, 70) * torch.linspace(0.01, 10, 50)[:, None]  # rows of very different scales
    q, scale = quantize_int8(w)
    back = dequantize_int8(q, scale)[:50, :70]
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    assert (dequantize_int8(q, scale)[:, 70:] == 0).all() and q.dtype == torch.int8


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
    lm_head = randn(70000, 48)  # three vocabulary chunks
    head = PackedHead(lm_head, quantization="int4")  # the head is int8 in both modes
    x = randn(3, 48, seed=5)
    logits = head.logits(x)
    want = F.linear(x.double(), torch.cat([linear.dequantized() for _, linear in head.chunks]).double())
    assert torch.allclose(logits.double(), want, atol=1e-3)
    assert head.nbytes < lm_head.numel() * lm_head.element_size() / 3


def test_bad_input_names_the_problem():
    linear = QuantizedLinear(randn(8, 64), None, "int8")
    with pytest.raises(RuntimeError, match="features"):
        linear(randn(2, 48))
    with pytest.raises(RuntimeError, match="residual"):
        linear.add(randn(2, 64), randn(3, 8))
    with pytest.raises(ValueError, match="quantization must be one of"):
        QuantizedLinear(randn(8, 64), None, "int3")
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.helios.int8_linear(randn(2, 64).double(), *linear.parts, 8, None, None)
    with pytest.raises(RuntimeError, match="out_features"):
        torch.ops.helios.int8_linear(randn(2, 64), *linear.parts, 9, None, None)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_opcheck(quantization):
    linear = QuantizedLinear(randn(12, 64), randn(12), quantization)
    op = torch.ops.helios.int8_linear if quantization == "int8" else torch.ops.helios.int4_linear
    torch.library.opcheck(op, (randn(3, 64), *linear.parts, 12, linear.bias, randn(3, 12)))


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
