"""Every bad input raises ValueError/TypeError (FileNotFoundError for missing models) naming what is wrong,
and the same LLM keeps working afterwards."""

from __future__ import annotations

import json
import shutil

import pytest

from helios import LLM, SamplingParams
from tests.conftest import PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=64, max_model_len=48)


@pytest.mark.parametrize("kwargs, error, field", [
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(n=0), ValueError, "n"),
    (dict(presence_penalty=2.5), ValueError, "presence_penalty"),
    (dict(frequency_penalty="x"), TypeError, "frequency_penalty"),
    (dict(repetition_penalty=0), ValueError, "repetition_penalty"),
    (dict(min_p=1.5), ValueError, "min_p"),
    (dict(min_tokens=-1), ValueError, "min_tokens"),
    (dict(min_tokens=20, max_tokens=10), ValueError, "min_tokens"),
    (dict(logprobs=-1), ValueError, "logprobs"),
    (dict(prompt_logprobs=1.5), TypeError, "prompt_logprobs"),
    (dict(skip_special_tokens=1), TypeError, "skip_special_tokens"),
    (dict(include_stop_str_in_output="no"), TypeError, "include_stop_str_in_output"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(max_tokens=2.5), TypeError, "max_tokens"),
    (dict(stop=[1, 2]), TypeError, "stop"),
    (dict(stop_token_ids=["a"]), TypeError, "stop_token_ids"),
    (dict(seed="x"), TypeError, "seed"),
    (dict(ignore_eos="yes"), TypeError, "ignore_eos"),
])
def test_bad_sampling_params(kwargs, error, field):
    with pytest.raises(error, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_leave_the_engine_working(llm):
    reference = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match="prompt must be a str"):
        llm.generate(["fine", 42], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate(["fine", {"prompt_token_ids": [5, 10**6]}], GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match="list of ints"):
        llm.generate({"prompt_token_ids": "5 6"}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt dict"):
        llm.generate({"prompt": "a", "text": "b"}, GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match="prompts must be"):
        llm.generate(None, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["fine", "word " * 200], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(PROMPTS[:3], [GREEDY, GREEDY], use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate(["fine"], [{"temperature": 0}], use_tqdm=False)
    with pytest.raises(ValueError, match="vocab"):
        llm.generate(["fine"], SamplingParams(stop_token_ids=[10**6]), use_tqdm=False)
    assert not llm.engine.has_unfinished()  # nothing half-queued
    again = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in reference]
    assert llm.stats()["kv_blocks_free"] == 64


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_layers=0), ValueError, "num_layers=0 is outside 1..4"),
    (dict(num_layers=5), ValueError, "num_layers=5 is outside 1..4"),
    (dict(num_layers="2"), TypeError, "num_layers"),
    (dict(memory_budget="lots"), ValueError, "memory_budget"),
    (dict(memory_budget=-1), ValueError, "memory_budget"),
    (dict(memory_budget="10KiB"), ValueError, "memory_budget"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(kv_cache_blocks=0), ValueError, "kv_cache_blocks"),
    (dict(max_num_seqs=0), ValueError, "max_num_seqs"),
    (dict(max_model_len=10_000), ValueError, "max_position_embeddings"),
    (dict(kv_cache_blocks=2, max_model_len=200), ValueError, "cannot hold one sequence"),
    (dict(dtype="int8"), ValueError, "dtype"),
    (dict(device="tpu"), ValueError, "device"),
])
def test_bad_engine_arguments(checkpoints, kwargs, error, match):
    with pytest.raises(error, match=match):
        LLM(checkpoints["llama"], **kwargs)


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(tmp_path / "nope")
    with pytest.raises(TypeError, match="model"):
        LLM(123)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(tmp_path)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_checkpoint(checkpoints, tmp_path):
    path = _copy(checkpoints["llama"], tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        LLM(path, kv_cache_blocks=8)


def test_corrupt_checkpoint_header(checkpoints, tmp_path):
    path = _copy(checkpoints["llama"], tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00garbage" + b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        LLM(path, kv_cache_blocks=8)


def _copy_without(src, dst, tensor_name):
    """A copy of checkpoint `src` whose safetensors file lacks one tensor."""
    from safetensors.torch import load_file, save_file

    path = _copy(src, dst)
    tensors = load_file(path / "model.safetensors")
    del tensors[tensor_name]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_checkpoint_missing_a_layer(checkpoints, tmp_path):
    path = _copy_without(checkpoints["llama"], tmp_path / "m", "model.layers.3.mlp.down_proj.weight")
    with pytest.raises(ValueError, match="layers.3.mlp.down_proj"):
        LLM(path, kv_cache_blocks=8)
    assert LLM(path, num_layers=3, kv_cache_blocks=8).stats()["loaded_layers"] == 3  # layer 4 never read


def test_untied_checkpoint_without_lm_head(checkpoints, tmp_path):
    path = _copy_without(checkpoints["llama"], tmp_path / "m", "lm_head.weight")
    with pytest.raises(ValueError, match="lm_head.weight"):
        LLM(path, kv_cache_blocks=8)


def test_unsupported_architecture_lists_supported(checkpoints, tmp_path):
    path = _copy(checkpoints["llama"], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama, mistral, opt, qwen2"):
        LLM(path, kv_cache_blocks=8)
