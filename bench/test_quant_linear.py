"""Weight-only int8/int4 linears (helios._C) vs the float32 linear helios serves without quantization (oneDNN
packed), on SmolLM2-135M's shapes, at decode batch sizes.

CPU:  python -m pytest bench/test_quant_linear.py --benchmark-json=bench/results/quant_linear-cpu.json
Groups are (shape, rows); float32 is each group's baseline. Every timed call is checked against the float64
oracle with the dequantized weight, so no speed is reported for a wrong result.
"""

from __future__ import annotations

import pytest
import torch

from helios._ext import load_extension
from helios.ops.linear import Linear
from helios.ops.quant import QuantizedLinear, quantized_linear_reference

load_extension()

# (out_features, in_features): SmolLM2-135M's fused gate+up, down, q/o, k/v projections and one LM-head chunk
SHAPES = {"gate_up": (3072, 576), "down": (576, 1536), "o_proj": (576, 576), "kv": (192, 576),
          "head_chunk": (32768, 576)}


@pytest.fixture(scope="module", params=list(SHAPES))
def weights(request):
    out_features, in_features = SHAPES[request.param]
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) / in_features**0.5
    return request.param, w, {"fp32": Linear(w), "int8": QuantizedLinear(w, None, "int8"),
                              "int4": QuantizedLinear(w, None, "int4")}


@pytest.mark.parametrize("rows", [1, 8, 16, 32])
@pytest.mark.parametrize("impl", ["fp32", "int8", "int4"])
def test_quant_linear(benchmark, weights, rows, impl):
    name, w, linears = weights
    linear = linears[impl]
    x = torch.randn(rows, w.shape[1])
    benchmark.group = f"linear {name} {list(SHAPES[name])} rows={rows}"
    nbytes = linear.nbytes if impl != "fp32" else w.numel() * w.element_size()
    benchmark.extra_info.update(shape=list(SHAPES[name]), rows=rows, weight_bytes=nbytes)
    got = benchmark.pedantic(linear, (x,), rounds=30, iterations=5, warmup_rounds=3)
    if impl == "fp32":
        want = torch.nn.functional.linear(x.double(), w.double())
    else:
        want = quantized_linear_reference(x, linear)
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()
