"""load_format="dummy": a model's real shapes with random weights, from config.json and a tokenizer alone."""

from __future__ import annotations

import shutil

import pytest

from helios import LLM, SamplingParams
from tests.conftest import PROMPTS


@pytest.fixture(scope="module")
def config_only(checkpoints, tmp_path_factory):
    """The tiny Llama's directory without its weights."""
    directory = tmp_path_factory.mktemp("config_only")
    for item in checkpoints["llama"].iterdir():
        if not item.name.endswith(".safetensors"):
            shutil.copy(item, directory / item.name)
    return directory


def test_dummy_weights_have_the_real_shapes(config_only, checkpoints):
    real = LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=32, num_layers=3)
    dummy = LLM(config_only, dtype="float32", kv_cache_blocks=32, num_layers=3, load_format="dummy")
    assert dummy.engine.model.num_parameters == real.engine.model.num_parameters
    assert dummy.stats()["weight_bytes"] == real.stats()["weight_bytes"]
    assert dummy.stats()["kv_bytes_per_token"] == real.stats()["kv_bytes_per_token"]


def test_dummy_weights_are_seeded_random_and_serve(config_only):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = [LLM(config_only, dtype="float32", kv_cache_blocks=64, load_format="dummy").generate(
        PROMPTS[:3], params, use_tqdm=False) for _ in range(2)]
    ids = [[o.outputs[0].token_ids for o in run] for run in runs]
    assert ids[0] == ids[1] and all(len(t) == 12 for t in ids[0])
    model = LLM(config_only, dtype="float32", kv_cache_blocks=8, load_format="dummy").engine.model
    assert 0.01 < model.embed_tokens.std() < 0.2  # random (initializer_range 0.1), not zeros
    assert len(set(ids[0][0])) > 1


def test_load_format_errors(config_only):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(config_only, kv_cache_blocks=8)  # no weights and no dummy: says what is missing
    with pytest.raises(ValueError, match="load_format"):
        LLM(config_only, kv_cache_blocks=8, load_format="pt")
