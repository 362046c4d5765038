"""The fused decode stack (helios._C decode_layers) against the per-layer path it replaces: the same tokens and
log-probabilities through whole generations (GQA, Qwen2 biases, Mistral sliding windows shorter than the context,
dimensions that are no multiple of the SIMD width, int8 and int4 weights), batch 1 (attention split by KV head) to
past its 48-token limit (mixed with the per-layer path), the same K/V written to the cache; where it is not used;
bad input."""

from __future__ import annotations

import pytest
import torch

import helios.model.llama as llama_module
from helios._ext import load_extension
from tests.conftest import PROMPTS, make_tokenizer

load_extension()
DECODE_LAYERS = llama_module.decode_layers


def _odd_checkpoint(directory, kind: str):
    """odd_llama / mistral_window: hidden 40 (a K tail for 16-lane vectors), head_dim 8, 5 heads over 1 KV head,
    mistral with window 5; quant_llama: every input width a multiple of the quantization group (32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    common = dict(vocab_size=300, hidden_size=40, intermediate_size=36, num_hidden_layers=3, num_attention_heads=5,
                  num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.2)
    if kind == "quant_llama":
        common.update(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    config = MistralConfig(**common, sliding_window=5) if kind == "mistral_window" else LlamaConfig(**common)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, safe_serialization=True)
    make_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def stack_checkpoints(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    paths = {kind: checkpoints[kind] for kind in ("llama", "llama_tied", "qwen2", "mistral")}
    for kind in ("odd_llama", "mistral_window", "quant_llama"):
        paths[kind] = _odd_checkpoint(root / kind, kind)
    return paths


def _generate(path, prompts, monkeypatch, stack: bool, quantization: str | None = None,
              kv_cache_dtype: str = "auto"):
    from helios import LLM, SamplingParams

    monkeypatch.setenv("HELIOS_DECODE_STACK", "1" if stack else "0")
    calls = []
    monkeypatch.setattr(llama_module, "decode_layers", lambda *a: calls.append(a[2].shape[0]) or DECODE_LAYERS(*a))
    llm = LLM(path, dtype="float32", kv_cache_blocks=512, max_num_seqs=64, quantization=quantization,
              kv_cache_dtype=kv_cache_dtype)
    assert llm.engine.model.use_stack == stack
    # lengths 8..31: the batch shrinks as requests finish (60 rows: per-layer steps, then stack steps)
    params = [SamplingParams(max_tokens=8 + i % 24, temperature=0, ignore_eos=True, logprobs=0)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    ids = [o.outputs[0].token_ids for o in outs]
    logprobs = [[next(iter(step.values())).logprob for step in o.outputs[0].logprobs] for o in outs]
    return ids, logprobs, calls


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "mistral", "odd_llama", "mistral_window"])
@pytest.mark.parametrize("batch", [1, 8, 60])
def test_stack_generates_what_the_per_layer_path_generates(stack_checkpoints, monkeypatch, kind, batch):
    prompts = [PROMPTS[i % len(PROMPTS)] + " x" * (i // len(PROMPTS)) for i in range(batch)]
    want_ids, want_lp, no_calls = _generate(stack_checkpoints[kind], prompts, monkeypatch, stack=False)
    got_ids, got_lp, calls = _generate(stack_checkpoints[kind], prompts, monkeypatch, stack=True)
    assert not no_calls
    assert calls and max(calls) <= 48  # decode steps went through the stack; 60 rows never in one call
    assert got_ids == want_ids
    for got, want in zip(got_lp, want_lp, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-4, rtol=0)


# at 20 rows: integer dot products (int8 / int4: int16 activations, w8a8 / w4a8: int8)
@pytest.mark.parametrize("quantization", ["int8", "int4", "w8a8", "w4a8"])
@pytest.mark.parametrize("batch", [1, 8, 20])
def test_quantized_stack_generates_what_the_quantized_per_layer_path_generates(stack_checkpoints, monkeypatch,
                                                                               quantization, batch):
    path = stack_checkpoints["quant_llama"]
    prompts = [PROMPTS[i % len(PROMPTS)] + " x" * (i // len(PROMPTS)) for i in range(batch)]
    want_ids, want_lp, _ = _generate(path, prompts, monkeypatch, stack=False, quantization=quantization)
    got_ids, got_lp, calls = _generate(path, prompts, monkeypatch, stack=True, quantization=quantization)
    assert calls and got_ids == want_ids
    for got, want in zip(got_lp, want_lp, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-4, rtol=0)


@pytest.mark.parametrize("kv_cache_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["llama", "odd_llama", "mistral_window"])
@pytest.mark.parametrize("batch", [1, 20])
def test_stack_over_a_narrower_cache_generates_what_the_per_layer_path_generates(stack_checkpoints, monkeypatch,
                                                                                  kv_cache_dtype, kind, batch):
    """kv_cache_dtype: both paths round K/V to the cache's type as they store them and read them back exactly. The
    two paths' float32 K/V differ in their last bits (summation order), which now and then rounds an element to the
    neighbouring 16-bit value: log-probabilities agree to about that step (bfloat16's is 8x float16's)."""
    prompts = [PROMPTS[i % len(PROMPTS)] + " x" * (i // len(PROMPTS)) for i in range(batch)]
    path = stack_checkpoints[kind]
    want_ids, want_lp, _ = _generate(path, prompts, monkeypatch, stack=False, kv_cache_dtype=kv_cache_dtype)
    got_ids, got_lp, calls = _generate(path, prompts, monkeypatch, stack=True, kv_cache_dtype=kv_cache_dtype)
    assert calls and got_ids == want_ids
    tolerance = {"float16": 5e-4, "bfloat16": 2e-3}[kv_cache_dtype]
    for got, want in zip(got_lp, want_lp, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=tolerance, rtol=0)


def test_stack_writes_the_per_layer_paths_kv(stack_checkpoints, monkeypatch):
    """The same decode step both ways, from the same cache: equal hidden states and equal K/V in every layer."""
    from helios import LLM, SamplingParams

    monkeypatch.setenv("HELIOS_DECODE_STACK", "1")
    llm = LLM(stack_checkpoints["mistral_window"], dtype="float32", kv_cache_blocks=128)
    runner, model = llm.engine.runner, llm.engine.model
    captured = {}
    real_step = runner.step

    def step(batch):  # capture the inputs of the first decode-only step and replay it both ways
        if "meta" not in captured and all(item.num_new_tokens == 1 and item.seq.num_computed_tokens for item in batch):
            input_ids, positions, meta, _ = runner.prepare(batch)
            caches = [(k.clone(), v.clone()) for k, v in runner.kv_layers]
            captured.update(meta=meta, input_ids=input_ids, positions=positions, caches=caches)
        return real_step(batch)

    monkeypatch.setattr(runner, "step", step)
    llm.generate(PROMPTS[:3], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    meta, ids, pos, before = captured["meta"], captured["input_ids"], captured["positions"], captured["caches"]
    fused_kv = [(k.clone(), v.clone()) for k, v in before]
    per_layer_kv = [(k.clone(), v.clone()) for k, v in before]
    with torch.inference_mode():
        fused = model.forward(ids, pos, fused_kv, meta)
        per_layer = super(type(model), model).forward(ids, pos, per_layer_kv, meta)
    torch.testing.assert_close(fused, per_layer, atol=1e-5, rtol=1e-5)
    slots = meta.slot_mapping
    for (fk, fv), (pk, pv), (bk, _) in zip(fused_kv, per_layer_kv, before, strict=True):
        new_k = fk.flatten(0, 1)[slots]
        assert torch.isfinite(new_k).all() and not torch.equal(new_k, bk.flatten(0, 1)[slots])  # written this step
        torch.testing.assert_close(fk, pk, atol=1e-5, rtol=1e-5, equal_nan=True)  # (unused slots are uninitialized)
        torch.testing.assert_close(fv, pv, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_stack_is_not_used_where_it_cannot_run(stack_checkpoints, monkeypatch):
    from helios import LLM

    monkeypatch.setenv("HELIOS_DECODE_STACK", "1")
    assert not LLM(stack_checkpoints["llama"], dtype="bfloat16", kv_cache_blocks=64).engine.model.use_stack
    # hidden size 48: quantized weights pad it to 64, the stack multiplies unpadded activations
    assert not LLM(stack_checkpoints["llama"], dtype="float32", quantization="int8",
                   kv_cache_blocks=64).engine.model.use_stack
    model = LLM(stack_checkpoints["llama"], dtype="float32", kv_cache_blocks=64).engine.model
    assert model.use_stack and all(layer.qkv.plain and layer.qkv.packed is None for layer in model.layers)


def test_decode_layers_names_bad_input():
    d, heads, dim, inter = 16, 2, 8, 8
    hidden, cos = torch.randn(1, d), torch.randn(10, dim)
    weights = [torch.ones(d), torch.ones(d), torch.randn(3 * heads * dim, d), torch.randn(d, heads * dim),
               torch.randn(2 * inter, d), torch.randn(d, inter)]
    cache = torch.zeros(4, 4, heads, dim)
    args = dict(positions=torch.tensor([3]), slot_mapping=torch.tensor([3]),
                block_tables=torch.zeros(1, 1, dtype=torch.int32), seq_lens=torch.tensor([4], dtype=torch.int32))

    def call(hidden=hidden, weights=weights, biases=(None,) * 4, bits=32, **kw):
        a = {**args, **kw}
        return torch.ops.helios.decode_layers(hidden, a["positions"], list(weights), list(biases), [cache], [cache],
                                              a["slot_mapping"], a["block_tables"], a["seq_lens"], cos, cos, heads,
                                              heads, 1e-5, 0.3, [-1], bits)

    assert call().shape == (1, d)
    with pytest.raises(RuntimeError, match="per layer 6 weights, 4 biases"):
        call(weights=weights[:5])
    with pytest.raises(RuntimeError, match="per layer 14 weights"):
        call(bits=8)
    with pytest.raises(RuntimeError, match="weight_bits must be 32"):
        call(bits=16)
    with pytest.raises(RuntimeError, match="is not a decode step"):
        call(seq_lens=torch.tensor([2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="1 to 48 tokens"):
        call(hidden=torch.randn(49, d))
    with pytest.raises(RuntimeError, match=r"o_proj weight must be contiguous float32 \[16, 16\]"):
        call(weights=weights[:3] + [torch.randn(d, 3)] + weights[4:])
    with pytest.raises(RuntimeError, match="slot 99 outside the cache"):
        call(slot_mapping=torch.tensor([99]))
