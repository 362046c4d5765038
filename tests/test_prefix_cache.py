"""Prefix caching: shared prompt prefixes reuse KV blocks and change no output."""

from __future__ import annotations

import pytest

from helios import LLM, SamplingParams

SYSTEM = "You are a careful assistant. Answer briefly and precisely. " * 3


def prompts(n: int = 12, system: str = SYSTEM) -> list[str]:
    return [f"{system}Question {i}: what follows {i}?" for i in range(n)]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
def test_shared_prefix_hits_and_outputs_match_no_cache(kind, checkpoints):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cached = LLM(checkpoints[kind], dtype="float32", kv_cache_blocks=256, block_size=4)
    plain = LLM(checkpoints[kind], dtype="float32", kv_cache_blocks=256, block_size=4, enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts(), params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in cached.generate(prompts(), params, use_tqdm=False)]
    assert got == want
    stats = cached.stats()
    assert stats["prefix_cache_hit_rate"] > 0.5  # all but the first share the long system prompt in one step
    assert plain.stats()["prefix_cache_hit_rate"] == 0
    again = [o.outputs[0].token_ids for o in cached.generate(prompts(), params, use_tqdm=False)]
    assert again == want and cached.stats()["prefix_cache_hit_rate"] > stats["prefix_cache_hit_rate"]
    assert cached.stats()["kv_blocks_free"] == 256


def test_prefix_cache_under_preemption_matches_ample_pool(checkpoints):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ample = LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=512, block_size=4, enable_prefix_caching=False)
    tiny = LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=40, block_size=4, max_model_len=96)
    many = prompts(32, system="Be brief. ")
    want = [o.outputs[0].token_ids for o in ample.generate(many, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in tiny.generate(many, params, use_tqdm=False)]
    assert tiny.stats()["num_preemptions"] > 0
    assert got == want


def test_reset_prefix_cache(checkpoints):
    llm = LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=64, block_size=4)
    llm.generate(prompts(2), SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert llm.stats()["kv_blocks_cached"] > 0
    llm.reset_prefix_cache()
    assert llm.stats()["kv_blocks_cached"] == 0
