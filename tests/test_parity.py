"""Parity with transformers on every device: prefill logits (fp32, 1e-4) and greedy token ids for every
architecture, truncated models, sliding windows, bf16 runs, and stories260k (a tiny trained Llama).

The transformers oracle always runs on the CPU in float32 (in bf16 for the bf16 comparison)."""

from __future__ import annotations

import pytest
import torch

from helios import LLM, SamplingParams
from tests.conftest import ARCHS, PROMPTS, hf_greedy, hf_logits, hf_model, stories260k_path

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(checkpoints, device):
    return {kind: LLM(checkpoints[kind], device=device, dtype="float32", kv_cache_blocks=256) for kind in ARCHS}


@pytest.mark.parametrize("kind", ARCHS)
def test_prefill_logits_match_transformers(kind, engines, checkpoints):
    llm, ref = engines[kind], hf_model(checkpoints[kind])
    for prompt in PROMPTS[:4]:
        ids = llm.get_tokenizer().encode(prompt)
        torch.testing.assert_close(llm.engine.prompt_logits(ids).cpu(), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)


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
def test_truncated_model_matches_cut_transformers(kind, k, checkpoints, device):
    llm = LLM(checkpoints[kind], device=device, dtype="float32", num_layers=k, kv_cache_blocks=128)
    ref = hf_model(checkpoints[kind], num_layers=k)
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    torch.testing.assert_close(llm.engine.prompt_logits(ids).cpu(), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)
    out = llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False)
    for o in out:
        assert o.outputs[0].token_ids == hf_greedy(ref, o.prompt_token_ids, 24)
    assert llm.stats()["loaded_layers"] == k


def test_sliding_window_matches_transformers(tmp_path, device):
    from transformers import AutoModelForCausalLM, MistralConfig

    from tests.conftest import make_tokenizer

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=5, initializer_range=0.1, attn_implementation="eager")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    llm = LLM(tmp_path, device=device, dtype="float32", kv_cache_blocks=64)
    ref = hf_model(tmp_path)
    ids = llm.get_tokenizer().encode(PROMPTS[7] + " " + PROMPTS[0])
    assert len(ids) > 5
    torch.testing.assert_close(llm.engine.prompt_logits(ids).cpu(), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)
    out = llm.generate(PROMPTS[7], GREEDY, use_tqdm=False)[0]  # decodes through the paged kernel's window
    assert out.outputs[0].token_ids == hf_greedy(ref, out.prompt_token_ids, 24)


def hf_bf16(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


# bf16 greedy runs equal transformers' bf16 runs token for token, except after a near-tie: where they first part,
# the two chosen tokens' float32 logits differ by under 2% of the logits' range (bf16 rounding, accumulated over the
# layers, may resolve a near-tie either way; how it does depends on the CPU's bf16 kernels: on an AVX-512 Xeon
# these three runs agreed completely, on an AVX2-only EPYC 2 of 8 prompts parted at gaps of 0.004-0.017 in a range
# of ~3.5).
@pytest.mark.parametrize("kind", ["llama", "llama_tied", "mistral"])
def test_bf16_greedy_agrees_with_transformers_bf16(kind, checkpoints, device):
    llm = LLM(checkpoints[kind], device=device, dtype="bfloat16", kv_cache_blocks=256)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    ref, fp32 = hf_bf16(checkpoints[kind]), hf_model(checkpoints[kind])
    for out in outs:
        got, want = out.outputs[0].token_ids, hf_greedy(ref, out.prompt_token_ids, 24)
        parted = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        if parted is None:
            continue
        logits = hf_logits(fp32, out.prompt_token_ids + got[:parted])[-1]
        gap = abs(float(logits[got[parted]] - logits[want[parted]]))
        assert gap < 0.02 * float(logits.max() - logits.min()), (out.prompt, parted, gap)


# ---- stories260k: a tiny trained Llama (../shared/models, or HELIOS_STORIES260K) -------------------------------

STORY_PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "One day, a big bird",
                 "Sam was sad because", "The sun was shining and", "Mom said", "There was a tree"]
needs_stories = pytest.mark.skipif(
    stories260k_path() is None, reason="stories260k not found: set HELIOS_STORIES260K or put ../shared beside the repo")


@needs_stories
def test_stories260k_greedy_and_truncated_match_transformers(device):
    path = stories260k_path()
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    llm = LLM(path, device=device, dtype="float32", kv_cache_blocks=256)
    ref = hf_model(path)
    outs = llm.generate(STORY_PROMPTS, params, use_tqdm=False)
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy(ref, out.prompt_token_ids, 48), out.prompt
    assert "Lily" in outs[0].outputs[0].text  # a real story, not noise
    cut = LLM(path, device=device, dtype="float32", num_layers=3, kv_cache_blocks=64)
    ids = outs[0].prompt_token_ids + outs[0].outputs[0].token_ids
    torch.testing.assert_close(cut.engine.prompt_logits(ids).cpu(), hf_logits(hf_model(path, num_layers=3), ids),
                               atol=1e-4, rtol=1e-4)


@needs_stories
def test_stories260k_bf16_loses_no_more_than_transformers_bf16(device):
    """stories260k's 64-wide layers are coarse in bf16. Teacher forced on the fp32 model's own greedy stories, helios
    in bf16 must pick the fp32 model's top token as often as transformers in bf16 does (within 0.01) and stay as
    close in distribution (KL to fp32 within 1.5x of transformers'). (Free-running greedy agreement was measured
    here before: one early near-tie decides a whole story, and on an AVX512-BF16 CPU it moved between 0.73 and 0.81
    with the kernels chosen while the teacher-forced figures stayed equal to transformers'.)"""
    path = stories260k_path()
    fp32, bf16 = hf_model(path), hf_bf16(path)
    llm = LLM(path, device=device, dtype="bfloat16", kv_cache_blocks=256)
    hits = {"helios": 0, "transformers": 0}
    kl = {"helios": 0.0, "transformers": 0.0}
    count = 0
    for prompt in STORY_PROMPTS:
        prompt_ids = llm.get_tokenizer().encode(prompt)
        ids = prompt_ids + hf_greedy(fp32, prompt_ids, 48)
        truth = hf_logits(fp32, ids).log_softmax(-1)
        for name, logits in (("helios", llm.engine.prompt_logits(ids).cpu()), ("transformers", hf_logits(bf16, ids))):
            got = logits.float().log_softmax(-1)
            hits[name] += (got.argmax(-1) == truth.argmax(-1)).sum().item()
            kl[name] += (truth.exp() * (truth - got)).sum().item()
        count += len(ids)
    assert hits["helios"] / count >= hits["transformers"] / count - 0.01, (hits, count)
    assert kl["helios"] <= 1.5 * kl["transformers"], kl
