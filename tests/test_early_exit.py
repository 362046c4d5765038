"""Early exits inside the stack: equivalences with plain decoding, threshold semantics, and an independent
reference of exits with hidden-state propagation built from transformers' own decoder layers."""

from __future__ import annotations

import pytest
import torch

from helios import LLM, ExitConfig, SamplingParams
from tests.conftest import PROMPTS, hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def run(path, device="cpu", **kwargs):
    llm = LLM(path, device=device, dtype="float32", kv_cache_blocks=256, **kwargs)
    return llm, [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt", "opt_postnorm_proj"])
def test_never_confident_equals_plain_decoding(kind, checkpoints):
    _, plain = run(checkpoints[kind])
    llm, exits = run(checkpoints[kind], early_exit=ExitConfig(layers="all", threshold=1.5))
    assert [o.token_ids for o in exits] == [o.token_ids for o in plain]
    assert all(layer == 4 for o in exits for layer in o.exit_layers)
    generated = sum(len(o.token_ids) for o in exits)
    assert llm.stats()["num_breaches"] == generated and llm.stats()["exit_histogram"] == {4: generated}


@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_threshold_zero_at_one_exit_equals_truncated_model(kind, k, checkpoints, device):
    _, truncated = run(checkpoints[kind], device, num_layers=k)
    llm, exits = run(checkpoints[kind], device, early_exit=ExitConfig(layers=[k], threshold=0.0))
    assert [o.token_ids for o in exits] == [o.token_ids for o in truncated]  # propagated K/V never leak in
    assert all(layer == k for o in exits for layer in o.exit_layers)
    assert llm.stats()["num_breaches"] == 0


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_exits_over_a_float16_cache_equal_the_truncated_model_over_one(kind, checkpoints):
    """kv_cache_dtype with early exits: the K/V propagated for rows that left early are rounded into the cache like
    any other, and still never leak into the layers the exit uses."""
    _, truncated = run(checkpoints[kind], num_layers=2, kv_cache_dtype="float16")
    llm, exits = run(checkpoints[kind], early_exit=ExitConfig(layers=[2], threshold=0.0), kv_cache_dtype="float16")
    assert llm.engine.kv_cache.pool.dtype == torch.float16
    assert [o.token_ids for o in exits] == [o.token_ids for o in truncated]
    assert all(layer == 2 for o in exits for layer in o.exit_layers)


@pytest.mark.parametrize("kind", ["llama_tied", "opt"])
@pytest.mark.parametrize("confidence, threshold", [("max_prob", 0.6), ("max_prob", 0.9), ("margin", 0.5),
                                                   ("entropy", 1.0)])
def test_every_early_exit_passes_its_threshold(kind, confidence, threshold, peaked_checkpoints):
    config = ExitConfig(layers="all", confidence=confidence, threshold=threshold)
    llm, outs = run(peaked_checkpoints[kind], early_exit=config)
    early = 0
    for o in outs:
        assert len(o.exit_layers) == len(o.confidences) == len(o.token_ids)
        for layer, conf in zip(o.exit_layers, o.confidences, strict=True):
            if layer < 4:
                early += 1
                assert conf <= threshold if confidence == "entropy" else conf >= threshold
    assert sum(llm.stats()["exit_histogram"].values()) == sum(len(o.token_ids) for o in outs)
    assert early > 0, "no token exited early: the threshold does not exercise the exits"


def test_sampling_with_exits_is_seeded_and_complete(peaked_checkpoints):
    params = SamplingParams(temperature=0.8, max_tokens=12, seed=5, ignore_eos=True)
    config = ExitConfig(layers="all", threshold=0.7)
    runs = [LLM(peaked_checkpoints["llama_tied"], kv_cache_blocks=128, early_exit=config).generate(
        PROMPTS, params, use_tqdm=False) for _ in range(2)]
    assert [o.outputs[0].token_ids for o in runs[0]] == [o.outputs[0].token_ids for o in runs[1]]
    assert all(len(o.outputs[0].exit_layers) == 12 for o in runs[0])
    assert any(layer < 4 for o in runs[0] for layer in o.outputs[0].exit_layers)


def test_exits_survive_preemption_without_losing_requests(peaked_checkpoints, device):
    llm = LLM(peaked_checkpoints["llama"], device=device, kv_cache_blocks=24, block_size=4, max_model_len=64,
              early_exit=ExitConfig(layers="all", threshold=0.7))
    prompts = [f"{PROMPTS[i % 8]} {i}" for i in range(32)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.stats()["num_preemptions"] > 0
    assert all(len(o.outputs[0].token_ids) == 16 == len(o.outputs[0].exit_layers) for o in outs)


@pytest.mark.parametrize("kwargs, error", [
    (dict(layers="some"), ValueError), (dict(layers=[0, 2]), ValueError), (dict(layers=[]), TypeError),
    (dict(layers=[1.5]), TypeError), (dict(confidence="logit"), ValueError), (dict(threshold="high"), TypeError),
    (dict(threshold=float("nan")), ValueError), (dict(confidence="entropy", threshold=-1), ValueError),
    (dict(heads=123), TypeError),
])
def test_bad_exit_config(kwargs, error):
    with pytest.raises(error, match="ExitConfig"):
        ExitConfig(**kwargs)


def test_exit_layers_deeper_than_loaded(checkpoints):
    with pytest.raises(ValueError, match="deeper than the 2 loaded layers"):
        LLM(checkpoints["llama"], num_layers=2, kv_cache_blocks=16, early_exit=ExitConfig(layers=[3]))
    with pytest.raises(TypeError, match="early_exit"):
        LLM(checkpoints["llama"], kv_cache_blocks=16, early_exit={"threshold": 0.5})


# ---- independent reference: transformers' decoder layers, one sequence at a time -------------------------

def reference_exits(model, prompt_ids, exit_layers, threshold, steps):
    """Greedy decoding with exits, from the definition: a token leaves at the first exit layer whose max
    softmax probability (final norm + LM head on that layer's hidden state) reaches the threshold, or at
    the last layer; deeper layers then get K/V from the exited hidden state (running the layer on it and
    keeping only what it writes into the cache)."""
    from transformers import DynamicCache

    inner = model.model
    depth = len(inner.layers)
    cache = DynamicCache(config=model.config)
    tokens, exits = [], []
    ids = list(prompt_ids)
    start = 0
    for _ in range(steps):
        x = torch.tensor([ids[start:]])
        pos = torch.arange(start, len(ids))[None]
        h = inner.embed_tokens(x)
        rope = inner.rotary_emb(h, pos)
        decided = None
        exited_h = None
        for i, layer in enumerate(inner.layers):
            source = exited_h if exited_h is not None else h
            out = layer(source, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=True,
                        position_embeddings=rope)
            out = out[0] if isinstance(out, tuple) else out
            if exited_h is not None:
                continue  # propagation only: the output of a skipped layer is discarded
            h = out
            if decided is None and (i + 1) in exit_layers:
                probs = model.lm_head(inner.norm(h[:, -1])).double().softmax(-1)[0]
                p1, token = probs.max(-1)
                if p1 >= threshold or i + 1 == depth:
                    decided = (int(token), i + 1)
                    if x.shape[1] == 1:  # decode rows leave; a prompt's rows run every layer
                        exited_h = h
        tokens.append(decided[0])
        exits.append(decided[1])
        start = len(ids)
        ids.append(decided[0])
    return tokens, exits


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2"])
@pytest.mark.parametrize("threshold", [0.6, 0.85])
def test_engine_matches_independent_reference(kind, threshold, peaked_checkpoints, device):
    ref = hf_model(peaked_checkpoints[kind])
    exit_layers = (1, 3, 4)
    llm = LLM(peaked_checkpoints[kind], device=device, dtype="float32", kv_cache_blocks=256,
              early_exit=ExitConfig(layers=[1, 3], threshold=threshold))
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    seen_layers = set()
    with torch.no_grad():
        for o in outs:
            tokens, exits = reference_exits(ref, o.prompt_token_ids, exit_layers, threshold, 10)
            assert o.outputs[0].token_ids == tokens, o.prompt
            assert o.outputs[0].exit_layers == exits, o.prompt
            seen_layers.update(exits)
    assert len(seen_layers) >= 2, f"threshold {threshold} exercised only exit layers {seen_layers}"
