"""helios.ops.exit_head (native; Triton compiled on CUDA, interpreted on CPU) vs a float64 reference on odd shapes,
and an ahead-of-time compile of the Triton kernel for Hopper (sm_90a), which needs no GPU."""

from __future__ import annotations

import os

import pytest
import torch

from helios.ops.exit_head import exit_head


def reference(hidden, lm_head, weight, bias, norm, eps, round_to=None):
    """float64 on the CPU. round_to: the dtype the normalized rows are rounded to before the LM head (the Triton
    kernel feeds 16-bit weights' tensor cores with rows in the weights' dtype, as the model's own head does)."""
    h = hidden.cpu().double()
    if norm == "rms":
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.cpu().double()
    elif norm == "layer":
        h = torch.nn.functional.layer_norm(h, (h.shape[1],), weight.cpu().double(),
                                           None if bias is None else bias.cpu().double(), eps)
    if round_to is not None:
        h = h.to(round_to).double()
    logits = h @ lm_head.cpu().double().t()
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


TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-3, 2e-3), torch.float16: (2e-3, 2e-3)}  # atol, rtol


def check(got, want, dtype=torch.float32):
    token, p1, p2, entropy = (t.cpu() for t in got)
    assert token.dtype == torch.int64 and p1.dtype == p2.dtype == entropy.dtype == torch.float32
    assert torch.equal(token, want[0])
    atol, rtol = TOLERANCE[dtype]
    for name, a, b in zip(("p1", "p2", "entropy"), (p1, p2, entropy), want[1:], strict=True):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


SHAPES = [(1, 40, 300), (5, 72, 1000), (17, 96, 777), (33, 40, 513)]


def on(device, *tensors, dtype=torch.float32):
    return [None if t is None else t.to(device=device, dtype=dtype) for t in tensors]


@pytest.mark.parametrize("norm", ["rms", "layer", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_native_matches_float64_reference(device, shape, norm):
    hidden, lm_head, weight, bias = on(device, *inputs(*shape, norm))
    got = exit_head(hidden, lm_head, weight, bias, norm=norm, eps=1e-5, backend="native")
    check(got, reference(hidden, lm_head, weight, bias, norm, 1e-5))


# B = 1/5/33/128 (one, two and three row-block sizes); no vocabulary size is a multiple of the 128-wide tile
TRITON_SHAPES = [(1, 40, 300), (5, 72, 1000), (33, 96, 777), (128, 64, 1111)]


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: f"B{s[0]}-d{s[1]}-V{s[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_matches_float64_reference(device, dtype, shape, norm):
    pytest.importorskip("triton")
    from helios.kernels.exit_head import kernel_mode

    if device.type == "cpu":
        if kernel_mode() != "interpreted":
            pytest.skip("this process compiled the Triton kernel for the GPU; CPU-only machines (CI) interpret it")
        if dtype == torch.bfloat16:
            pytest.skip("the Triton interpreter has no bfloat16 (float16 covers the 16-bit path on CPU)")
    else:
        assert kernel_mode() == "compiled", "TRITON_INTERPRET=1 is set: the compiled kernel would not be tested"
    hidden, lm_head, weight, bias = on(device, *inputs(*shape, norm), dtype=dtype)
    got = exit_head(hidden, lm_head, weight, bias, norm=norm, eps=1e-5, backend="triton")
    assert all(t.device.type == device.type for t in got)
    round_to = None if dtype == torch.float32 else dtype
    check(got, reference(hidden, lm_head, weight, bias, norm, 1e-5, round_to), dtype)


HOPPER_COMPILE = """
import os, sys
os.environ["TRITON_INTERPRET"] = "0"  # compile, even without a GPU
import triton
from triton.backends.compiler import GPUTarget
from helios.kernels.exit_head import _exit_head_partials

pointers = ["h_ptr", "w_ptr", "nw_ptr", "nb_ptr"]
outputs = ["m_out", "d_out", "s_out", "t1_out", "t2_out"]
ints = ["B", "D", "V", "tiles_per_split", "stride_h", "stride_w"]
for dtype, block_b in [("fp32", 16), ("bf16", 16), ("bf16", 64), ("fp16", 64)]:
    signature = {**{p: "*" + dtype for p in pointers}, **{o: "*fp32" for o in outputs}, "i1_out": "*i32",
                 **{i: "i32" for i in ints}, "eps": "fp32"}
    consts = dict(NORM=2, HAS_BIAS=True, HALF_DOT=dtype != "fp32", BLOCK_B=block_b, BLOCK_V=128, BLOCK_K=64)
    signature.update({c: "constexpr" for c in consts})
    source = triton.compiler.ASTSource(fn=_exit_head_partials, signature=signature, constexprs=consts)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    ptx = kernel.asm["ptx"]
    print(dtype, block_b, kernel.metadata.shared, "wgmma" in ptx, "mma.sync" in ptx)
"""


def test_triton_kernel_compiles_for_hopper():
    """Every dtype path of the kernel compiles to sm_90a machine code; 16-bit weights use the tensor cores."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], capture_output=True, text=True, env=env,
                            timeout=300)
    if result.returncode != 0 and "No module named 'triton.backends.nvidia'" in result.stderr:
        pytest.skip("this triton build has no NVIDIA backend")
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = {(d, int(b)): (int(shared), wgmma == "True", mma == "True")
                for d, b, shared, wgmma, mma in (line.split() for line in result.stdout.strip().splitlines())}
    assert len(compiled) == 4
    assert all(shared <= 227 * 1024 for shared, _, _ in compiled.values())  # Hopper's shared memory per block
    assert compiled[("bf16", 64)][1] and compiled[("fp16", 64)][1]  # warpgroup MMA at 64-row blocks
    assert compiled[("bf16", 16)][2]  # mma.sync below 64 rows


@pytest.mark.parametrize("chunk", [64, 300, 4096])
def test_greedy_head_matches_float64_argmax_and_max_prob(device, chunk):
    """Plain greedy decoding's head (token + its probability, chunk by chunk) vs float64, with a tie across chunks."""
    from helios.ops.exit_head import PackedHead, greedy_head_native

    hidden, lm_head, _, _ = on(device, *inputs(9, 40, 1000, "none", seed=4))
    lm_head[700] = lm_head[int(reference(hidden[:1], lm_head, None, None, "none", 0)[0])]  # a tie, later index
    token, p1 = greedy_head_native(hidden, PackedHead(lm_head, chunk=chunk), None)
    logits = hidden.cpu().double() @ lm_head.cpu().double().T
    assert torch.equal(token.cpu(), logits.argmax(-1))  # argmax: the lowest index of a tie (topk's order is not)
    torch.testing.assert_close(p1.cpu().double(), logits.softmax(-1).max(-1).values, atol=2e-5, rtol=1e-4)


def test_native_ties_inside_a_chunk_keep_the_lowest_index():
    from helios.ops.exit_head import PackedHead, exit_head_native

    lm_head = torch.zeros(300, 4)
    lm_head[[7, 150, 299]] = torch.tensor([1.0, 0, 0, 0])  # three tied best rows in one chunk
    token, p1, p2, _ = exit_head_native(torch.tensor([[2.0, 0, 0, 0]] * 3), PackedHead(lm_head), None)
    assert token.tolist() == [7, 7, 7] and torch.equal(p1, p2)


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


def test_exit_head_is_callable_where_the_readme_says_and_its_module_stays_importable():
    import importlib
    import inspect

    import helios.ops

    assert inspect.isfunction(helios.ops.exit_head)
    module = importlib.import_module("helios.ops.exit_head")
    assert module.exit_head is helios.ops.exit_head and callable(module.exit_head_native)


def test_readme_exit_head_example_runs(capsys):
    import json
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "helios.ops.exit_head(" in b]
    assert len(blocks) == 1
    exec(compile("\n".join(line.removeprefix("  ") for line in blocks[0].splitlines()), "README.md", "exec"), {})
    tokens, probs = (json.loads(f"[{part}]") for part in re.findall(r"\[([^\]]*)\]", capsys.readouterr().out))
    assert len(tokens) == len(probs) == 4
    assert all(0 <= t < 49152 for t in tokens) and all(0 < p <= 1 for p in probs)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gemma_norm_matches_float64_reference(device, backend):
    """Gemma's RMSNorm: the (1 + w) weight applied in float32 (Norm kind 'rms_fp32'), natively and fused."""
    from helios.kernels.exit_head import kernel_mode
    from helios.ops.exit_head import exit_head_native
    from helios.ops.norm import Norm

    if backend == "triton" and (device.type == "cpu") != (kernel_mode() == "interpreted"):
        pytest.skip("the Triton kernel runs compiled on a GPU and interpreted on CPU-only machines, one per process")
    hidden, lm_head, w, _ = on(device, *inputs(7, 64, 1003, "rms", seed=5))
    weight = 1.0 + (w - 1.0) * 3  # Gemma stores w and multiplies by 1 + w: pass that sum, in float32
    want = reference(hidden, lm_head, weight, None, "rms", 1e-6)
    if backend == "native":
        got = exit_head_native(hidden, lm_head, Norm("rms_fp32", weight, None, 1e-6))
    else:
        got = exit_head(hidden, lm_head, weight, norm=Norm("rms_fp32", weight, None, 1e-6).fused_kind, eps=1e-6,
                        backend="triton")
    check(got, want)


# helios._C's fused CPU head (PackedHead.stats, the engine's CPU path): rows below and above the 16-row switch to the
# batch-along-lanes kernel and past the 48-row block; vocabularies that are no multiple of the 4-row tiles or of
# the 240-row chunks the threads share
STATS_SHAPES = [(1, 40, 300), (5, 72, 1000), (17, 96, 777), (33, 40, 513), (49, 64, 241)]


@pytest.mark.parametrize("shape", STATS_SHAPES, ids=lambda s: f"B{s[0]}-d{s[1]}-V{s[2]}")
def test_fused_cpu_head_matches_float64_reference(shape):
    from helios._ext import load_extension
    from helios.ops.exit_head import PackedHead

    load_extension()
    hidden, lm_head, _, _ = inputs(*shape, "none")
    head = PackedHead(lm_head)
    assert head.weight is not None and head.nbytes == 0  # the plain weight, no prepared copy
    check(head.stats(hidden), reference(hidden, lm_head, None, None, "none", 0.0))


def test_fused_cpu_head_ties_keep_the_lowest_index_across_chunks():
    """The same top logit in two chunks (rows 7 and 250) and twice inside one (rows 500, 501): the lowest token
    wins, p2 == p1, as argmax and the reference do."""
    from helios._ext import load_extension
    from helios.ops.exit_head import PackedHead

    load_extension()
    lm_head = torch.zeros(600, 4)
    lm_head[[7, 250], 0] = 1.0
    lm_head[[500, 501], 1] = 1.0
    hidden = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0]])
    token, p1, p2, _ = PackedHead(lm_head).stats(hidden)
    assert token.tolist() == [7, 500]
    torch.testing.assert_close(p1, p2)
    want = reference(hidden, lm_head, None, None, "none", 0.0)
    torch.testing.assert_close(p1.double(), want[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("quantization", ["int8", "w8a8"])
@pytest.mark.parametrize("rows", [1, 20])
def test_fused_int8_head_matches_the_reference_on_its_dequantized_weight(rows, quantization):
    from helios._ext import load_extension
    from helios.ops.exit_head import PackedHead

    load_extension()
    hidden, lm_head, _, _ = inputs(rows, 72, 1001, "none", seed=3)  # 72 features: the int8 tiles pad K to 96
    from helios.ops.quant import as_multiplied

    head = PackedHead(lm_head, quantization=quantization)
    dequantized = head.quantized.dequantized()
    # from 12 rows the kernel multiplies the rows rounded per group (w8a8: int8, int8: int16), where the CPU has integer
    # dot products
    rows_as_multiplied = as_multiplied(hidden, head.quantized.round_activations)
    check(head.stats(hidden), reference(rows_as_multiplied, dequantized, None, None, "none", 0.0))


def test_fused_cpu_head_names_bad_input():
    from helios._ext import load_extension

    load_extension()
    with pytest.raises(RuntimeError, match="x has 5 features, the weight expects 4"):
        torch.ops.helios.head_stats(torch.randn(2, 5), torch.randn(10, 4))
    with pytest.raises(RuntimeError, match="weight must be contiguous float32"):
        torch.ops.helios.head_stats(torch.randn(2, 4), torch.randn(4, 10).t())
