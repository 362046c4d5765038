"""Preemption by recompute and KV pool sizing for the loaded layers."""

from __future__ import annotations

import pytest
import torch

from helios import LLM, SamplingParams
from tests.conftest import PROMPTS


def prompts_32():
    return [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_tiny_pool_preempts_and_matches_ample_pool(kind, checkpoints, device):
    prompts = prompts_32()
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)] * 16 + [
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=i, ignore_eos=True) for i in range(16)]
    ample = LLM(checkpoints[kind], device=device, dtype="float32", kv_cache_blocks=512, block_size=4)
    tiny = LLM(checkpoints[kind], device=device, dtype="float32", kv_cache_blocks=24, block_size=4, max_model_len=64)
    want = ample.generate(prompts, params, use_tqdm=False)
    got = tiny.generate(prompts, params, use_tqdm=False)
    assert tiny.stats()["num_preemptions"] > 0, "the pool was not small enough to force preemption"
    assert ample.stats()["num_preemptions"] == 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert all(len(o.outputs[0].token_ids) == 20 for o in got)
    assert tiny.stats()["kv_blocks_free"] == 24  # everything returned after the run


def test_kv_bytes_scale_with_loaded_layers_and_blocks_grow(checkpoints):
    budget = 3 * 2**20
    full = LLM(checkpoints["llama"], dtype="float32", memory_budget=budget, max_num_seqs=4,
               max_num_batched_tokens=64).stats()
    for k in (1, 2, 3):
        part = LLM(checkpoints["llama"], dtype="float32", memory_budget=budget, num_layers=k, max_num_seqs=4,
                   max_num_batched_tokens=64).stats()
        assert part["kv_bytes_per_token"] * full["loaded_layers"] == full["kv_bytes_per_token"] * k
        assert part["weight_bytes"] < full["weight_bytes"]
        assert part["kv_blocks_total"] > full["kv_blocks_total"]
        assert part["kv_cache_bytes"] <= budget - part["weight_bytes"]
    assert full["kv_blocks_total"] > 0


def test_a_16_bit_kv_cache_halves_the_bytes_per_token_and_holds_more_blocks(checkpoints):
    budget = 3 * 2**20
    sizes = {kv: LLM(checkpoints["llama"], dtype="float32", memory_budget=budget, max_num_seqs=4,
                     max_num_batched_tokens=64, kv_cache_dtype=kv) for kv in ("auto", "float16", "bf16")}
    stats = {kv: llm.stats() for kv, llm in sizes.items()}
    assert [stats[kv]["kv_cache_dtype"] for kv in sizes] == ["float32", "float16", "bfloat16"]
    for kv in ("float16", "bf16"):
        assert sizes[kv].engine.kv_cache.pool.dtype == {"float16": torch.float16, "bf16": torch.bfloat16}[kv]
        assert 2 * stats[kv]["kv_bytes_per_token"] == stats["auto"]["kv_bytes_per_token"]
        assert stats[kv]["kv_blocks_total"] > 1.9 * stats["auto"]["kv_blocks_total"]
        assert stats[kv]["kv_cache_bytes"] <= budget - stats[kv]["weight_bytes"]


def test_kv_cache_dtype_names_what_is_wrong(checkpoints):
    with pytest.raises(ValueError, match="kv_cache_dtype='int8' is not supported"):
        LLM(checkpoints["llama"], kv_cache_blocks=16, kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="for float32 models"):
        LLM(checkpoints["llama"], dtype="bfloat16", kv_cache_blocks=16, kv_cache_dtype="float16")
    with pytest.raises(TypeError, match="kv_cache_dtype must be a string or torch.dtype"):
        LLM(checkpoints["llama"], kv_cache_blocks=16, kv_cache_dtype=16)
    assert LLM(checkpoints["llama"], dtype="bfloat16", kv_cache_blocks=16,
               kv_cache_dtype=torch.bfloat16).stats()["kv_cache_dtype"] == "bfloat16"  # the model's own: fine


def test_truncated_load_reads_only_its_layers(checkpoints, monkeypatch):
    from helios.model.checkpoint import Checkpoint

    read = []
    original = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name, *a: read.append(name) or original(self, name, *a))
    LLM(checkpoints["llama"], num_layers=2, kv_cache_blocks=8)
    assert any("layers.1." in n for n in read)
    assert not any("layers.2." in n or "layers.3." in n for n in read)
