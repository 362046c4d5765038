"""Gemma 3 text decoder vs transformers on random tiny checkpoints: several layer_types patterns, a sliding window
shorter than the prompts (so that it matters), GQA with 1 and 2 KV heads, mixed prompt lengths in one batch."""

from __future__ import annotations

import pytest
import torch

from helios import LLM, ExitConfig, SamplingParams
from tests.conftest import PROMPTS, hf_greedy, hf_logits, hf_model, make_tokenizer

WINDOW = 6
CONFIGS = {  # name -> (layer_types, kv_heads)
    "pattern-sssf-kv1": (["sliding_attention"] * 3 + ["full_attention"], 1),
    "pattern-fsfs-kv2": (["full_attention", "sliding_attention"] * 2, 2),
    "all-sliding-kv2": (["sliding_attention"] * 3, 2),
}
LONG_PROMPTS = [p + " " + PROMPTS[(i + 3) % 8] for i, p in enumerate(PROMPTS)]  # mixed lengths, all > WINDOW


def build_gemma3(directory, layer_types, kv_heads, seed=0):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=32, max_position_embeddings=256,
        sliding_window=WINDOW, layer_types=layer_types, query_pre_attn_scalar=24, initializer_range=0.1,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's norms hold w of (1 + w); random, so a wrong (1 + w) shows
                p.uniform_(-0.3, 0.3)
    model.save_pretrained(directory, safe_serialization=True)
    make_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gemmas(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    return {name: build_gemma3(root / name, *spec) for name, spec in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_logits_match_transformers(name, gemmas, device):
    llm = LLM(gemmas[name], device=device, dtype="float32", kv_cache_blocks=64)
    ref = hf_model(gemmas[name])
    assert llm.stats()["architecture"] == "gemma3_text"
    for prompt in LONG_PROMPTS[:3]:
        ids = llm.get_tokenizer().encode(prompt)
        assert len(ids) > WINDOW
        torch.testing.assert_close(llm.engine.prompt_logits(ids).cpu(), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_40_tokens_in_one_mixed_batch_match_transformers(name, gemmas, device):
    llm = LLM(gemmas[name], device=device, dtype="float32", kv_cache_blocks=128)
    ref = hf_model(gemmas[name])
    outs = llm.generate(LONG_PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert len({len(o.prompt_token_ids) for o in outs}) > 3  # mixed lengths really
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy(ref, out.prompt_token_ids, 40), out.prompt


@pytest.mark.parametrize("k", [1, 2])
def test_truncated_gemma3_matches_cut_transformers(k, gemmas, device):
    path = gemmas["pattern-fsfs-kv2"]
    llm = LLM(path, device=device, dtype="float32", num_layers=k, kv_cache_blocks=64)
    full = LLM(path, device=device, dtype="float32", kv_cache_blocks=64)
    ref = hf_model(path, num_layers=k)
    ids = llm.get_tokenizer().encode(LONG_PROMPTS[1])
    torch.testing.assert_close(llm.engine.prompt_logits(ids).cpu(), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)
    out = llm.generate(LONG_PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(ref, out.prompt_token_ids, 24)
    assert llm.stats()["kv_bytes_per_token"] * 4 == full.stats()["kv_bytes_per_token"] * k


def test_exits_on_gemma3(gemmas, device):
    """An exit at layer k with threshold 0 equals the model truncated to k (propagated K/V never leak in), and a
    threshold above 1 equals plain decoding."""
    path = gemmas["pattern-sssf-kv1"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    truncated = LLM(path, device=device, dtype="float32", num_layers=2, kv_cache_blocks=128).generate(
        LONG_PROMPTS, params, use_tqdm=False)
    exits = LLM(path, device=device, dtype="float32", kv_cache_blocks=128,
                early_exit=ExitConfig(layers=[2], threshold=0.0)).generate(LONG_PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in exits] == [o.outputs[0].token_ids for o in truncated]
    plain = LLM(path, device=device, dtype="float32", kv_cache_blocks=128).generate(LONG_PROMPTS, params,
                                                                                     use_tqdm=False)
    never = LLM(path, device=device, dtype="float32", kv_cache_blocks=128,
                early_exit=ExitConfig(layers="all", threshold=1.5)).generate(LONG_PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in never] == [o.outputs[0].token_ids for o in plain]


def test_multimodal_gemma3_config_is_refused_clearly(tmp_path):
    from transformers import Gemma3Config

    Gemma3Config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="multimodal Gemma 3"):
        LLM(tmp_path)


def test_fused_exit_head_equals_the_gemma_models_own_logits(gemmas, device):
    """The exit head (native on CPU, Triton on CUDA) with Gemma's norm gives the argmax and probabilities of the
    model's own final norm + tied LM head, and stats() splits the bytes into layers, embedding and head."""
    from helios.engine.exit_step import confidence_from_logits

    llm = LLM(gemmas["pattern-fsfs-kv2"], device=device, dtype="float32", kv_cache_blocks=16)
    model = llm.engine.model
    hidden = torch.randn(9, model.hidden_size, generator=torch.Generator().manual_seed(3)).to(device) * 4
    token, p1, p2, entropy = model.exit_head(hidden)
    logits = model.compute_logits(hidden).float()
    assert torch.equal(token, logits.argmax(-1))
    for got, want in zip((p1, p2, entropy), confidence_from_logits(logits), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    stats = llm.stats()
    assert stats["lm_head_tied"] and stats["lm_head_bytes"] == stats["embedding_bytes"] == 300 * 64 * 4
    assert stats["layer_bytes"] > 0
