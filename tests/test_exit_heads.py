"""Exit heads: file format round-trip, identity = logit lens, adapters applied exactly, wrong model rejected."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helios import LLM, ExitConfig, SamplingParams
from helios.exits.heads import MANIFEST_FILE, MODEL_SUBFOLDER, ExitAdapter, ExitHeads, model_fingerprint
from tests.conftest import PROMPTS, hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def outputs(llm):
    return [(o.outputs[0].token_ids, o.outputs[0].exit_layers, o.outputs[0].confidences)
            for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def random_heads(model, layers, seed=0, thresholds=None, norm_weight=False):
    g = torch.Generator().manual_seed(seed)
    d = model.hidden_size
    adapters = {layer: ExitAdapter(torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d**0.5,
                                   0.1 * torch.randn(d, generator=g),
                                   (1 + 0.2 * torch.randn(d, generator=g)) if norm_weight else None)
                for layer in layers}
    return ExitHeads(model_fingerprint(model), adapters, thresholds=thresholds, confidence="max_prob",
                     info={"training_tokens": 123, "held_out_agreement": {str(k): 0.5 for k in layers}})


def test_manifest_round_trip(peaked_checkpoints, tmp_path):
    model = LLM(peaked_checkpoints["llama"], kv_cache_blocks=16).engine.model
    heads = random_heads(model, [1, 3], thresholds={1: 0.8, 3: 0.6}, norm_weight=True)
    loaded = ExitHeads.load(heads.save(tmp_path / "heads"))
    assert loaded.fingerprint == heads.fingerprint and loaded.layers == [1, 3] and loaded.kind == "affine"
    assert loaded.thresholds == {1: 0.8, 3: 0.6} and loaded.confidence == "max_prob"
    assert loaded.info == {"training_tokens": 123, "held_out_agreement": {"1": 0.5, "3": 0.5}}
    for layer in (1, 3):
        for name in ("weight", "bias", "norm_weight"):
            assert torch.equal(getattr(loaded.adapters[layer], name), getattr(heads.adapters[layer], name))


def test_identity_heads_reproduce_the_logit_lens_exactly(peaked_checkpoints, tmp_path):
    path = peaked_checkpoints["llama_tied"]
    plain = LLM(path, kv_cache_blocks=256, early_exit=ExitConfig(layers=[1, 2, 3], threshold=0.7))
    model = plain.engine.model
    identity = ExitHeads(model_fingerprint(model), {k: ExitAdapter.identity(model.hidden_size) for k in (1, 2, 3)})
    heads_dir = identity.save(tmp_path / "identity")
    tuned = LLM(path, kv_cache_blocks=256, early_exit=ExitConfig(heads=heads_dir, threshold=0.7))
    assert tuned.stats()["early_exit"]["layers"] == [1, 2, 3, 4]
    want, got = outputs(plain), outputs(tuned)
    assert [w[:2] for w in want] == [g[:2] for g in got]
    for w, g in zip(want, got, strict=True):
        assert g[2] == pytest.approx(w[2], abs=1e-6)
    assert any(layer < 4 for w in want for layer in w[1])


def test_adapter_and_exit_norm_are_applied_before_norm_and_head(peaked_checkpoints, tmp_path):
    """threshold 0 at one exit k: every token is argmax(head(norm_k(A·h_k + b))) of the first k layers."""
    path = peaked_checkpoints["llama"]
    base = LLM(path, kv_cache_blocks=16)
    heads = random_heads(base.engine.model, [2], seed=3, norm_weight=True)
    llm = LLM(path, kv_cache_blocks=256, early_exit=ExitConfig(heads=heads.save(tmp_path / "h"), layers=[2],
                                                               threshold=0.0))
    ref = hf_model(path)
    adapter = heads.adapters[2]
    with torch.no_grad():
        for out in llm.generate(PROMPTS[:4], GREEDY, use_tqdm=False):
            ids = list(out.prompt_token_ids)
            for token in out.outputs[0].token_ids:
                h = ref(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, -1]
                x = adapter(h)
                eps = ref.config.rms_norm_eps
                x = x * torch.rsqrt(x.pow(2).mean() + eps) * adapter.norm_weight
                assert token == int(ref.lm_head(x).argmax())
                ids.append(token)
            assert set(out.outputs[0].exit_layers) == {2}


def test_heads_for_another_model_are_rejected(peaked_checkpoints, tmp_path):
    other = LLM(peaked_checkpoints["qwen2"], kv_cache_blocks=16).engine.model
    heads_dir = random_heads(other, [2]).save(tmp_path / "qwen_heads")
    with pytest.raises(ValueError, match="made for another model"):
        LLM(peaked_checkpoints["llama"], kv_cache_blocks=16, early_exit=ExitConfig(heads=heads_dir))


def test_model_folder_heads_are_found_and_calibrated_thresholds_used(peaked_checkpoints, tmp_path):
    path = shutil.copytree(peaked_checkpoints["llama"], tmp_path / "model")
    model = LLM(path, kv_cache_blocks=16).engine.model
    random_heads(model, [1, 3], thresholds={1: 0.95, 3: 0.55}).save(path / MODEL_SUBFOLDER)
    llm = LLM(path, kv_cache_blocks=64, early_exit=ExitConfig())
    info = llm.stats()["early_exit"]
    assert info["heads"].endswith(MODEL_SUBFOLDER) and info["layers"] == [1, 3, 4]
    assert info["thresholds"] == {1: 0.95, 3: 0.55, 4: 0.9}
    explicit = LLM(path, kv_cache_blocks=64, early_exit=ExitConfig(threshold=0.5)).stats()["early_exit"]
    assert explicit["thresholds"] == {1: 0.5, 3: 0.5, 4: 0.5}
    with pytest.raises(ValueError, match="calibrated for confidence='max_prob'"):
        LLM(path, kv_cache_blocks=64, early_exit=ExitConfig(confidence="entropy"))
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for o in outs:
        for layer, conf in zip(o.outputs[0].exit_layers, o.outputs[0].confidences, strict=True):
            assert layer == 4 or conf >= {1: 0.95, 3: 0.55}[layer]


def test_bad_heads_folders(peaked_checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        LLM(peaked_checkpoints["llama"], kv_cache_blocks=16, early_exit=ExitConfig(heads=tmp_path / "none"))
    model = LLM(peaked_checkpoints["llama"], kv_cache_blocks=16).engine.model
    heads_dir = random_heads(model, [2]).save(tmp_path / "h")
    manifest = json.loads((heads_dir / MANIFEST_FILE).read_text())
    manifest["exit_layers"] = [2, 3]
    (heads_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="lists layer 3"):
        LLM(peaked_checkpoints["llama"], kv_cache_blocks=16, early_exit=ExitConfig(heads=heads_dir))
