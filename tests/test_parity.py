"""Parity with transformers: prefill logits (fp32, 1e-4) and greedy token ids, for every architecture."""

from __future__ import annotations

import pytest
import torch

from helios import LLM, SamplingParams
from tests.conftest import ARCHS, PROMPTS, hf_greedy, hf_logits, hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(checkpoints):
    return {kind: LLM(checkpoints[kind], dtype="float32", kv_cache_blocks=256) for kind in ARCHS}


@pytest.mark.parametrize("kind", ARCHS)
def test_prefill_logits_match_transformers(kind, engines, checkpoints):
    llm, ref = engines[kind], hf_model(checkpoints[kind])
    for prompt in PROMPTS[:4]:
        ids = llm.get_tokenizer().encode(prompt)
        torch.testing.assert_close(llm.engine.prompt_logits(ids), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ARCHS)
def test_greedy_ids_match_transformers(kind, engines, checkpoints):
    llm, ref = engines[kind], hf_model(checkpoints[kind])
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outputs] == PROMPTS  # prompt order kept
    for out in outputs:
        assert out.outputs[0].token_ids == hf_greedy(ref, out.prompt_token_ids, 24), out.prompt
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kind", ["llama", "opt", "opt_postnorm_proj"])
@pytest.mark.parametrize("k", [1, 3])
def test_truncated_model_matches_cut_transformers(kind, k, checkpoints):
    llm = LLM(checkpoints[kind], dtype="float32", num_layers=k, kv_cache_blocks=128)
    ref = hf_model(checkpoints[kind], num_layers=k)
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    torch.testing.assert_close(llm.engine.prompt_logits(ids), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)
    out = llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False)
    for o in out:
        assert o.outputs[0].token_ids == hf_greedy(ref, o.prompt_token_ids, 24)
    assert llm.stats()["loaded_layers"] == k


def test_sliding_window_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, MistralConfig

    from tests.conftest import make_tokenizer

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=5, initializer_range=0.1, attn_implementation="eager")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    llm = LLM(tmp_path, dtype="float32", kv_cache_blocks=64)
    ref = hf_model(tmp_path)
    ids = llm.get_tokenizer().encode(PROMPTS[7] + " " + PROMPTS[0])
    assert len(ids) > 5
    torch.testing.assert_close(llm.engine.prompt_logits(ids), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)
