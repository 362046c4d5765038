"""Sampling, stopping and output bookkeeping."""

from __future__ import annotations

import pytest

from helios import LLM, SamplingParams
from tests.conftest import PROMPTS


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=128)


def ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], params, use_tqdm=False)
    batched = llm.generate([PROMPTS[0]] + PROMPTS[1:5], [params] + [SamplingParams(temperature=1.0, seed=1)] * 4,
                           use_tqdm=False)
    assert ids(alone)[0] == ids(batched)[0]
    other = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=12, seed=8, ignore_eos=True),
                         use_tqdm=False)
    assert ids(other)[0] != ids(alone)[0]


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    top1 = llm.generate(PROMPTS, SamplingParams(temperature=0.7, top_k=1, max_tokens=10, ignore_eos=True, seed=3),
                        use_tqdm=False)
    assert ids(top1) == ids(greedy)


def test_stop_token_ids_and_stop_strings(llm):
    base = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                  stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1] and out.finish_reason == "stop"
    text = base.text
    needle = text[len(text) // 2: len(text) // 2 + 2]
    assert needle.strip()
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=needle),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == text[: text.find(needle)]


def test_eos_stops_unless_ignored(llm):
    eos = 2
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)
    for o in out:
        toks = o.outputs[0].token_ids
        assert (toks[-1] == eos) == (o.outputs[0].finish_reason == "stop")
        assert eos not in toks[:-1]
        assert o.outputs[0].finish_reason == "stop" or len(toks) == 30


def test_max_model_len_ends_with_length(checkpoints):
    llm = LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=16, max_model_len=12)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 12
    assert out.outputs[0].finish_reason == "length"


def test_stream_yields_the_generated_text(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    pieces = list(llm.stream(PROMPTS[3], params))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.generate(PROMPTS[3], params, use_tqdm=False)[0].outputs[0].text


def test_token_id_prompts_equal_their_text(llm):
    """vLLM's prompt forms: {"prompt_token_ids": [...]} and {"prompt": text} give the outputs of the text."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS[:3]]
    by_text = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    by_ids = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    by_dict = llm.generate([{"prompt": p} for p in PROMPTS[:3]], params, use_tqdm=False)
    for text, tokens, wrapped, i in zip(by_text, by_ids, by_dict, ids, strict=True):
        assert tokens.outputs[0].token_ids == text.outputs[0].token_ids == wrapped.outputs[0].token_ids
        assert tokens.prompt_token_ids == i and tokens.prompt is None and wrapped.prompt == text.prompt
