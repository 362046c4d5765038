"""The control plane on tiny models: truncation reads only the chosen layers, depth growth equals a model of the new
depth, live calibration, selection rules, and domain shifts that trigger growth or a switch without losing a
request."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer

from helios import LLM, SamplingParams
from helios.config import EngineConfig
from helios.control import SLO
from helios.control.profile import Profile
from helios.control.repository import ModelFacts, ModelRepository
from helios.control.selector import choose_depth, choose_exits, live_threshold, plan_candidate, select
from helios.engine.engine import LLMEngine
from helios.exits.thresholds import ExitStats
from helios.model import checkpoint as checkpoint_module

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
DOMAIN_A = ["The quick brown fox", "She sells sea shells", "Once upon a time there was"]
DOMAIN_B = ["Numbers: 1 2 3 4 5", "A B C D E F", "def add(a, b):"]


# ---- tiny candidates whose confidence depends on the prompt's domain -------------------------------------------
def domain_checkpoint(directory: Path, confident: list[str], tokenizer=None, layers: int = 6) -> Path:
    """A Llama whose layers add nothing (o_proj and down_proj are zero), so every exit sees the embedding and agrees
    with the last layer. Tokens of the `confident` texts embed onto an LM-head row (the next token is confident and
    again such a token); every other token embeds to zero (uniform logits, max prob 1/vocab). A workload of other
    text makes every token a breach at any truncated depth."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = tokenizer or make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    successor: dict[int, int] = {}  # each token of the confident texts predicts the token after it there
    for text in confident:
        ids = [t for t in tokenizer.encode(text) if t > 2]
        for token, nxt in zip(ids, ids[1:] + ids[:1], strict=True):
            successor.setdefault(token, nxt)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = model.lm_head.weight
        head.normal_(0, 1)
        embed = model.model.embed_tokens.weight
        embed.zero_()
        for token, nxt in successor.items():
            embed[token] = head[nxt]
        model.model.norm.weight.fill_(1.0)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def domain_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("domains")
    return {"a": domain_checkpoint(root / "a", DOMAIN_A), "b": domain_checkpoint(root / "b", DOMAIN_B)}


SMALL_SLO = dict(profile_requests=2, breach_window=20, max_breaches=10, min_exits=5, probe_layers=3,
                 reprofile_interval=1000)


# ---- truncation and growth -------------------------------------------------------------------------------------
def _reads(monkeypatch) -> list[str]:
    names: list[str] = []
    original = checkpoint_module.Checkpoint.get

    def get(self, name, dtype, device):
        names.append(name)
        return original(self, name, dtype, device)

    monkeypatch.setattr(checkpoint_module.Checkpoint, "get", get)
    return names


def _layers_read(names: list[str]) -> set[int]:
    return {int(n.split("layers.")[1].split(".")[0]) for n in names if "layers." in n}


def test_truncation_and_growth_read_only_their_layers(checkpoints, monkeypatch):
    names = _reads(monkeypatch)
    engine = LLMEngine(EngineConfig(checkpoints["llama"], num_layers=2, kv_cache_blocks=32))
    assert _layers_read(names) == {0, 1}
    names.clear()
    engine.grow(4)
    assert _layers_read(names) == {2, 3} and not any("embed" in n or "lm_head" in n for n in names)
    assert engine.model.loaded_layers == 4 and engine.kv_cache.num_layers == 4


def _greedy_ids(engine: LLMEngine, prompt: str = "The quick brown fox") -> list[int]:
    request = engine.make_request(prompt, GREEDY)
    engine.add_request(request)
    while engine.has_unfinished():
        engine.step()
    return request.seqs[0].output_token_ids


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_an_engine_sharing_weights_reads_only_the_layers_it_lacks(checkpoints, monkeypatch, kind):
    config = EngineConfig(checkpoints[kind], kv_cache_blocks=32)
    full = LLMEngine(config)
    names = _reads(monkeypatch)
    short = LLMEngine(EngineConfig(checkpoints[kind], num_layers=2, kv_cache_blocks=32), share_weights=full)
    assert names == [] and short.layers_read == 0  # nothing read again: layers 1..2, embedding and head shared
    fresh = LLMEngine(EngineConfig(checkpoints[kind], num_layers=2, kv_cache_blocks=32))
    names.clear()
    deep = LLMEngine(config, share_weights=short)
    assert _layers_read(names) == {2, 3} and deep.layers_read == 2
    for shared, alone in ((short, fresh), (deep, full)):
        assert (shared.model.weight_bytes, shared.model.layer_bytes, shared.model.num_parameters) == (
            alone.model.weight_bytes, alone.model.layer_bytes, alone.model.num_parameters)
        assert _greedy_ids(shared) == _greedy_ids(alone)
    assert short.model.loaded_layers == 2 and full.model.loaded_layers == 4  # the donor is unchanged
    with pytest.raises(ValueError, match="cannot share weights"):
        LLMEngine(EngineConfig(checkpoints[kind], kv_cache_blocks=32, max_model_len=64), share_weights=full)


def test_deployment_and_reprofiling_reuse_the_weights_in_memory(domain_models, monkeypatch):
    names = _reads(monkeypatch)
    llm = LLM(domain_models["a"], slo=SLO(**SMALL_SLO), kv_cache_blocks=64)
    assert _layers_read(names) == set(range(6))  # the cold-start profile reads the whole model
    names.clear()
    llm.generate(DOMAIN_A, GREEDY, use_tqdm=False)
    depth = llm.stats()["control"]["depth"]
    assert depth < 6 and names == []  # the truncated deployment shares the profiled engine's layers 1..L
    llm.set_slo(SLO(**{**SMALL_SLO, "objective": "memory"}))  # re-profiles the active model at full depth
    assert names == []  # on the next requests: nothing is loaded for a round without traffic
    assert all(o.finished for o in llm.generate(DOMAIN_A, GREEDY, use_tqdm=False))
    assert _layers_read(names) == set(range(depth, 6))  # only the layers the deployment lacks


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_tokens_after_growth_equal_a_model_of_the_new_depth(checkpoints, kind):
    engine = LLMEngine(EngineConfig(checkpoints[kind], num_layers=2, kv_cache_blocks=64))
    request = engine.make_request("The quick brown fox", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    engine.add_request(request)
    for _ in range(6):
        engine.step()
    seq = request.seqs[0]
    before = list(seq.token_ids)
    engine.grow(4)
    assert engine.stats()["kv_blocks_free"] < engine.stats()["kv_blocks_total"] or engine.has_unfinished()
    while engine.has_unfinished():
        engine.step()
    after = seq.token_ids[len(before):]
    deep = LLM(checkpoints[kind], num_layers=4, kv_cache_blocks=64)
    (out,) = deep.generate([{"prompt_token_ids": before}],
                           SamplingParams(temperature=0, max_tokens=len(after), ignore_eos=True), use_tqdm=False)
    assert after == out.outputs[0].token_ids
    assert engine.kv_cache.allocator.num_free == engine.kv_cache.num_blocks  # nothing leaked across the re-lay


def test_failed_growth_keeps_serving(checkpoints):
    engine = LLMEngine(EngineConfig(checkpoints["llama"], num_layers=2, kv_cache_blocks=32))
    request = engine.make_request("Water boils at", GREEDY)
    engine.add_request(request)
    engine.step()
    with pytest.raises(ValueError, match="cannot grow"):
        engine.grow(9)
    assert engine.model.loaded_layers == 2 and len(engine.model.layers) == 2
    while engine.has_unfinished():
        engine.step()
    assert len(request.seqs[0].output_token_ids) == GREEDY.max_tokens


# ---- live calibration and selection ------------------------------------------------------------------------------
def _brute_force(values: torch.Tensor, agree: torch.Tensor, target: float, min_exits: int) -> float | None:
    best = None
    for t in sorted(set(values.tolist())):
        chosen = values >= t
        n = int(chosen.sum())
        if n >= min_exits and int(agree[chosen].sum()) / n >= target:
            best = t if best is None else min(best, t)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_live_threshold_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(300, generator=g).round(decimals=2)
    agree = torch.rand(300, generator=g) < values  # more confident, more often right
    stats = ExitStats("max_prob", {3: values}, {3: agree})
    for target in (0.7, 0.85, 0.95):
        got = live_threshold(stats, 3, target, 10)
        want = _brute_force(values, agree, target, 10)
        assert got == pytest.approx(want) if want is not None else got is None


def _profile(pairs: dict[int, tuple[torch.Tensor, torch.Tensor]], total: int = 8, per_layer: float = 1.0,
             per_check: float = 2.0, model: str = "m", prompt_bpb: float = 1.0) -> Profile:
    return Profile(model=model, total_layers=total, requests=5, tokens=len(next(iter(pairs.values()))[0]),
                   seconds=10.0, seconds_per_layer=per_layer, seconds_per_check=per_check, rows_per_step=4.0,
                   prompt_bpb=prompt_bpb, output_bpb=1.0, confidence="max_prob",
                   pairs={k: {"values": v.tolist(), "agree": a.tolist()} for k, (v, a) in pairs.items()})


def test_live_thresholds_meet_the_target_where_offline_ones_are_overconfident():
    """Offline calibration on one kind of text picks a threshold that live traffic of another kind fails; the
    threshold calibrated on the first half of live traffic holds on the second half."""
    g = torch.Generator().manual_seed(0)

    def traffic(n, power):
        values = torch.rand(n, generator=g)
        return values, torch.rand(n, generator=g) < values ** power  # P(right | confidence v) = v ** power

    off_values, off_agree = traffic(2000, 1)
    offline = ExitStats("max_prob", {4: off_values}, {4: off_agree})
    offline_threshold = live_threshold(offline, 4, 0.9, 20)
    live_values, live_agree = traffic(40000, 3)  # live text: the same confidence is right less often
    first, second = slice(0, 20000), slice(20000, 40000)
    live = ExitStats("max_prob", {4: live_values[first]}, {4: live_agree[first]})
    live_thr = live_threshold(live, 4, 0.9, 20)

    def precision(threshold):
        chosen = live_values[second] >= threshold
        return float(live_agree[second][chosen].float().mean())

    assert precision(offline_threshold) < 0.85
    assert precision(live_thr) >= 0.88  # the target 0.9, within the sampling noise of ~2000 confident tokens


def test_depth_is_the_smallest_layer_covering_the_target_share():
    n = 400
    confident = torch.ones(n)
    half = torch.cat([torch.ones(n // 2), torch.zeros(n // 2)])
    right, wrong_half = torch.ones(n, dtype=torch.bool), torch.cat([torch.ones(n // 2), torch.zeros(n // 2)]).bool()
    profile = _profile({2: (half, wrong_half), 4: (confident * 0.95, right), 6: (confident, right)})
    depth, threshold, coverage = choose_depth(profile, SLO(coverage=0.9))
    assert (depth, coverage) == (4, 1.0) and threshold == pytest.approx(0.95)
    # nothing covers 0.9 -> the whole model
    low = _profile({2: (half, wrong_half)})
    assert choose_depth(low, SLO(coverage=0.9))[0] == 8


def test_an_intermediate_exit_is_kept_only_when_it_pays_for_its_check():
    n = 400
    at2 = torch.cat([torch.ones(n // 2), torch.zeros(n // 2)])  # half the tokens leave confidently at layer 2
    right = torch.ones(n, dtype=torch.bool)
    pairs = {2: (at2, at2 > 0.5), 6: (torch.ones(n), right)}  # the unconfident half is wrong at layer 2
    # saving 0.5 x (6 - 2) x 1.0 s = 2 s per token > 1 x 1.0 s check: kept
    assert choose_exits(_profile(pairs, per_check=1.0), 6, SLO())[0] == (2,)
    # the same exit with a check costing 3 s: dropped
    assert choose_exits(_profile(pairs, per_check=3.0), 6, SLO())[0] == ()


def test_selection_follows_the_objective_under_the_quality_guard():
    n = 200
    right = torch.ones(n, dtype=torch.bool)
    fast = _profile({2: (torch.ones(n), right)}, model="fast", per_layer=0.5, prompt_bpb=2.0)
    good = _profile({4: (torch.ones(n), right)}, model="good", prompt_bpb=1.0)
    facts = ModelFacts("x", 8, bytes_per_layer=1000, fixed_bytes=500, kv_bytes_per_token_per_layer=10, tokenizer="t")
    plans = [plan_candidate(p, facts, SLO(), memory_budget=10**6, max_model_len=100) for p in (fast, good)]
    # "fast" is 2x worse in bits per byte: outside the 10% tolerance, so the guard leaves only "good"
    assert select(plans, SLO(bpb_tolerance=0.1)).model == "good"
    assert select(plans, SLO(bpb_tolerance=2.0)).model == "fast"
    memory = select(plans, SLO(objective="memory", bpb_tolerance=2.0))
    assert memory.max_seqs == max(p.max_seqs for p in plans)


def test_repository_persists_facts_and_profiles(tmp_path):
    path = tmp_path / "repo.json"
    repo = ModelRepository(path)
    repo.set_facts(ModelFacts("m", 8, 10.0, 5, 2, "tok", 0.01))
    n = 50
    repo.record(_profile({2: (torch.rand(n), torch.ones(n, dtype=torch.bool))}))
    warm = ModelRepository(path)
    assert warm.candidates["m"].facts == repo.candidates["m"].facts
    assert warm.pht() == repo.pht() and warm.candidates["m"].latest.layers == [2]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a helios model repository"):
        ModelRepository(path)


def test_slo_validation():
    with pytest.raises(ValueError, match="objective"):
        SLO(objective="speed")
    with pytest.raises(ValueError, match="max_breaches"):
        SLO(breach_window=10, max_breaches=10)
    with pytest.raises(ValueError, match="target_precision"):
        SLO(target_precision=0)
    with pytest.raises(ValueError, match="probe_layers"):
        SLO(probe_layers="some")
    assert SLO.parse("latency").objective == "latency"


def test_probe_layers_are_the_trained_heads_when_there_are_any():
    from helios.control.profile import probe_layers

    assert probe_layers(30, "auto", (10, 20, 24)) == (10, 20, 24)  # untuned layers are not worth their checks
    assert probe_layers(30, "auto") == probe_layers(30, 8)  # no heads: 8 layers spread over the stack
    assert len(probe_layers(30, 8)) == 8 and max(probe_layers(30, 8)) < 30
    assert set(probe_layers(30, 3, (10,))) == set(probe_layers(30, 3)) | {10}
    assert probe_layers(6, "auto", (6, 9)) == probe_layers(6, 8)  # heads outside 1..total-1 do not count


# ---- the loop -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_greedy_probes_through_the_fused_head_record_what_full_logits_give(peaked_checkpoints, kind):
    """Profiling greedy rows reads the LM head once per step for the last layer and every probe (twice on the steps
    that time an exit check) instead of writing full logits: the records equal those of the full-logits path (rows
    that ask for logprobs)."""
    from helios.engine.probes import ProbeLog

    logs = []
    for params in (GREEDY, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)):
        engine = LLMEngine(EngineConfig(peaked_checkpoints[kind], kv_cache_blocks=64))
        log = ProbeLog((1, 2, 3))
        engine.set_probes(log)
        greedy_head, calls = engine.model.greedy_head, []
        engine.model.greedy_head = lambda rows, f=greedy_head, c=calls: c.append(len(rows)) or f(rows)
        for prompt in DOMAIN_A:
            engine.add_request(engine.make_request(prompt, params))
        while engine.has_unfinished():
            engine.step()
        logs.append(log)
        assert bool(calls) == (params is GREEDY)  # which path ran
    fused, full = logs
    assert fused.tokens == full.tokens == len(DOMAIN_A) * GREEDY.max_tokens
    assert 0 < fused.untimed_steps and 0 < fused.check_steps < full.check_steps and fused.check_seconds > 0
    for layer in (1, 2, 3):
        assert fused.agree[layer] == full.agree[layer]
        assert fused.values[layer] == pytest.approx(full.values[layer], abs=1e-4)
    assert sorted(fused.output_nats) == sorted(full.output_nats)
    for request_id, nats in full.output_nats.items():
        assert fused.output_nats[request_id] == pytest.approx(nats, abs=1e-4)
    assert fused.prompt_nats == pytest.approx(full.prompt_nats, rel=1e-5)


def test_profiling_times_the_exit_check_alone_on_the_first_steps_then_every_eighth():
    """A timed step reads the LM head twice (the check alone, then the probes): only CHECK_TIMED steps and then one
    in CHECK_EVERY may do that (a counter that stopped advancing on timed steps once timed every step after the
    11th, doubling the head reads of a 32-token profile)."""
    from helios.engine.probes import CHECK_EVERY, CHECK_TIMED, ProbeLog

    class Model:  # two rows, every probe agrees with the last layer
        def greedy_head(self, rows):
            self.head_reads += 1
            return torch.zeros(2, dtype=torch.long), torch.ones(2)

        def exit_head_batch(self, states):
            self.head_reads += 1
            return {key: (torch.zeros(2, dtype=torch.long), torch.ones(2), torch.zeros(2), torch.zeros(2))
                    for key in states}

    model, log = Model(), ProbeLog((1, 2))
    model.head_reads = 0
    steps = 40
    for _ in range(steps):
        log.record_greedy(model, {1: torch.zeros(2, 4), 2: torch.zeros(2, 4)}, torch.zeros(2, 4))
    timed = CHECK_TIMED + (steps - CHECK_TIMED) // CHECK_EVERY
    assert (log.check_steps, log.untimed_steps) == (timed, steps - timed)
    assert model.head_reads == steps + timed and log.tokens == 2 * steps and log.agree[1] == [True] * (2 * steps)


@pytest.mark.parametrize("kind,quantization", [("llama", None), ("opt", None), ("llama_tied", None),
                                               ("llama", "int8")])
def test_prompt_nats_equal_a_float64_log_softmax(peaked_checkpoints, kind, quantization):
    """The prompt's -ln p per token (bits per byte of the profile), from the fused head's statistics where it
    applies (float32 CPU) and from full logits elsewhere (int8 head), against float64 logits of the same rows."""
    engine = LLMEngine(EngineConfig(peaked_checkpoints[kind], kv_cache_blocks=64, quantization=quantization))
    model = engine.model
    ids = engine.make_request("Once upon a time there was a fox who sold sea shells", GREEDY).prompt_token_ids
    hidden = engine.hidden_states([ids], [model.loaded_layers])[model.loaded_layers][:-1]
    weight = model.lm_head if quantization is None else model.head.quantized.dequantized()
    logits = model.head_input(hidden).double() @ weight.double().T
    want = -logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    got = model.token_nats(hidden, torch.tensor(ids[1:]))
    assert got.dtype == torch.float32 and len(got) == len(ids) - 1
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)
    assert engine.prompt_nats(ids) == pytest.approx(float(want.sum()), rel=1e-4)


def test_llm_arguments_for_the_control_plane(checkpoints):
    with pytest.raises(ValueError, match="num_layers is chosen"):
        LLM([checkpoints["llama"], checkpoints["qwen2"]], num_layers=2)
    with pytest.raises(ValueError, match="repository"):
        LLM(checkpoints["llama"], repository="x.json")
    llm = LLM(checkpoints["llama"], kv_cache_blocks=64)
    with pytest.raises(ValueError, match="set_slo needs"):
        llm.set_slo("latency")


def test_profiling_selects_a_truncated_model_and_serves_every_request(domain_models, tmp_path):
    llm = LLM(domain_models["a"], slo=SLO(**SMALL_SLO), kv_cache_blocks=64, repository=tmp_path / "r.json")
    prompts = DOMAIN_A * 3
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outputs] == prompts
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens and o.finished for o in outputs)
    stats = llm.stats()
    control = stats["control"]
    kinds = [e["kind"] for e in stats["events"]]
    assert kinds[:2] == ["reassess", "profile"] and "select" in kinds and "truncate" in kinds
    # every exit agrees on this model and domain A is confident: the smallest probed layer covers it all
    assert control["depth"] < stats["total_layers"] and stats["loaded_layers"] == control["depth"]
    assert control["pht"][0]["prompt_bpb"] is not None and control["pht"][0]["tokens"] > 0
    # the profiled requests' outputs are the same as the deployed model's (no work thrown away, none recomputed)
    plain = LLM(domain_models["a"], kv_cache_blocks=64).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in plain]
    assert (tmp_path / "r.json").is_file()


def _profile_every_candidate(llm: LLM) -> None:
    """Cold start with candidates a and b: a's profile takes the first requests (an interim a serves the rest), the
    next requests profile b while the interim serves the others."""
    for _ in range(2):
        assert all(o.finished for o in llm.generate(DOMAIN_A * 2, GREEDY, use_tqdm=False))
    assert len(llm.stats()["control"]["pht"]) == 2


def test_candidates_bits_per_byte_are_compared_on_the_same_prompts(domain_models):
    import math

    llm = LLM([domain_models["a"], domain_models["b"]], slo=SLO(**SMALL_SLO), kv_cache_blocks=64)
    _profile_every_candidate(llm)  # a and b were profiled on different requests
    rows = {row["model"]: row for row in llm.stats()["control"]["pht"]}
    a, b = rows[str(domain_models["a"])], rows[str(domain_models["b"])]
    assert a["reference"] == b["reference"] and a["reference_bpb"] == a["prompt_bpb"]
    # b's reference bits per byte: b's own likelihood of the prompts a was profiled on
    judge = LLMEngine(EngineConfig(domain_models["b"], kv_cache_blocks=64))
    nats = num_bytes = 0
    for text in DOMAIN_A[:SMALL_SLO["profile_requests"]]:
        ids = judge.make_request(text, GREEDY).prompt_token_ids
        log_probs = judge.prompt_logits(ids)[:-1].log_softmax(-1)
        nats -= float(log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
        num_bytes += len(judge.tokenizer.decode(ids[1:], skip_special_tokens=True).encode())
    assert b["reference_bpb"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-5)
    select = next(e for e in llm.stats()["events"] if e["kind"] == "select" and "profiles complete" in e["reason"])
    assert "same reference prompts" in select["reason"]


def test_each_candidates_tokenizer_is_loaded_once(domain_models, monkeypatch):
    from helios.engine import engine as engine_module

    loaded: list[str] = []
    original = engine_module.AutoTokenizer.from_pretrained

    def from_pretrained(path, *args, **kwargs):
        loaded.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(engine_module.AutoTokenizer, "from_pretrained", from_pretrained)
    llm = LLM([domain_models["a"], domain_models["b"]], slo=SLO(**SMALL_SLO), kv_cache_blocks=64)
    # before any request: the first candidate's engines and the other candidate's tokenizer
    assert sorted(loaded) == sorted(str(domain_models[m]) for m in "ab")
    _profile_every_candidate(llm)  # builds b's profiling engine, then the deployment
    llm.set_slo(SLO(**{**SMALL_SLO, "objective": "memory"}))
    _profile_every_candidate(llm)
    assert sorted(loaded) == sorted(str(domain_models[m]) for m in "ab")  # every later engine reused them
    controller = llm.engine
    assert controller.active.engine.tokenizer is controller.engines.tokenizers[controller.active.model]


def test_at_a_cold_start_no_request_waits_for_the_first_profile(domain_models, monkeypatch):
    llm = LLM([domain_models["a"], domain_models["b"]], slo=SLO(**SMALL_SLO), kv_cache_blocks=64)
    controller = llm.engine
    profiling, interim = controller.profiling.engine, controller.active.engine
    # the interim engine serves beside the profile, on the same weights, with the whole pool
    assert interim.model.layers[0] is profiling.model.layers[0] and interim.layers_read == 0
    assert interim.kv_cache.num_blocks == 64 > profiling.kv_cache.num_blocks
    requests = [controller.make_request(p, GREEDY) for p in DOMAIN_A + DOMAIN_B]
    for request in requests:
        controller.add_request(request)
    controller.step()
    # the profile's two requests and the four beyond them all ran in the first step
    assert all(r.seqs[0].seq is not None and r.seqs[0].seq.num_output_tokens == 1 for r in requests)
    assert [r.seqs[0].engine for r in requests] == [profiling] * 2 + [interim] * 4 and not controller.pending
    while controller.has_unfinished():
        controller.step()
    assert all(len(r.output().outputs[0].token_ids) == GREEDY.max_tokens for r in requests)
    profiled = next(e for e in controller.events.events if e.kind == "profile" and e.reason.startswith("profiled"))
    # the profile measured its own requests only (its timing is not diluted by the others)
    assert profiled.data["requests"] == SMALL_SLO["profile_requests"]
    assert profiled.data["tokens"] == SMALL_SLO["profile_requests"] * GREEDY.max_tokens


def test_a_domain_shift_triggers_growth_or_a_switch_and_nothing_is_lost(domain_models):
    llm = LLM([domain_models["a"], domain_models["b"]], slo=SLO(**SMALL_SLO), kv_cache_blocks=64)
    first = llm.generate(DOMAIN_A * 2, GREEDY, use_tqdm=False)  # profiles a (an interim a serves the other 4)
    first += llm.generate(DOMAIN_A * 2, GREEDY, use_tqdm=False)  # profiles b; the interim serves the rest
    assert all(o.finished for o in first)
    # cold start: once a is profiled, its full-depth engine serves the other requests while b is profiled
    order = [(e.kind, e.reason.split(":")[0]) for e in llm.engine.events.events]
    interim = order.index(("select", "interim"))
    assert order.index(("profile", f"profiling {domain_models['a']} on the next 2 requests")) < interim < \
        order.index(("profile", f"profiled {domain_models['a']}")) < \
        order.index(("profile", f"profiled {domain_models['b']}"))
    control = llm.stats()["control"]
    assert control["active_model"] == str(domain_models["a"])  # a is confident on domain A, b is not
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    shifted = llm.generate(DOMAIN_B * 3, params, use_tqdm=False)
    assert [o.prompt for o in shifted] == DOMAIN_B * 3
    assert all(o.finished and len(o.outputs[0].token_ids) >= 1 for o in shifted)
    stats = llm.stats()
    actions = [e for e in stats["events"] if e["kind"] in ("grow", "switch")]
    assert actions, [e["reason"] for e in stats["events"]]
    assert all("breaches" in e["reason"] and "costs" in e["data"] for e in actions)
    assert stats["control"]["breaches_total"] > SMALL_SLO["max_breaches"]
    assert not llm.engine.has_unfinished() and llm.engine.active.engine.kv_cache.allocator.num_free == \
        llm.engine.active.engine.kv_cache.num_blocks


def _switch_across_tokenizers(domain_models, b: Path, params: SamplingParams, steps_before: int = 4):
    """A request that model a starts and b (another tokenizer) finishes: (request, its sample, controller, the
    stable text streamed after every step)."""
    llm = LLM([domain_models["a"], b], slo=SLO(**SMALL_SLO), kv_cache_blocks=64)
    _profile_every_candidate(llm)
    controller = llm.engine
    if controller.active.model != str(domain_models["a"]):
        controller._deploy(next(p for p in controller._plans() if p.model == str(domain_models["a"])))
    request = controller.make_request("The quick brown fox", params)
    controller.add_request(request)
    cseq = request.seqs[0]
    snapshots = []
    for _ in range(steps_before):
        controller.step()
        snapshots.append(controller.stable_text(cseq))
    target = next(p for p in controller._plans() if p.model == str(b))
    controller._deploy(target)  # what a breach would decide: switch to b, which has a tokenizer of its own
    switch = controller.events.events[-1]
    assert switch.kind == "switch" and "as text" in switch.reason and switch.data["moved"] == 1
    assert cseq.engine is controller.active.engine and cseq.models == [str(domain_models["a"]), str(b)]
    while controller.has_unfinished():
        controller.step()
        snapshots.append(controller.stable_text(cseq))
    return request, cseq, controller, snapshots


def test_cross_tokenizer_switch_keeps_the_streamed_text(domain_models, tmp_path):
    b = domain_checkpoint(tmp_path / "b2", DOMAIN_B, tokenizer=_retrained_tokenizer())
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    request, cseq, controller, snapshots = _switch_across_tokenizers(domain_models, b, params)
    final = request.output().outputs[0]
    assert all(final.text.startswith(s) for s in snapshots)  # what was streamed never changes
    assert final.text == cseq.prefix_text + controller.active.engine.outputs.text(cseq.seq)
    # b continues exactly as b alone would from prompt + the text a had generated
    left = params.max_tokens - len(cseq.prefix_token_ids)
    (alone,) = LLM(b, kv_cache_blocks=64).generate(
        request.prompt_text + cseq.prefix_text, SamplingParams(temperature=0, max_tokens=left, ignore_eos=True),
        use_tqdm=False)
    assert cseq.seq.output_token_ids == alone.outputs[0].token_ids
    assert len(final.token_ids) == len(cseq.prefix_token_ids) + left


def test_a_stop_string_spanning_a_cross_tokenizer_switch_ends_the_request(domain_models, tmp_path):
    # b knows domain A too (through its own tokenizer), so its continuation is visible text
    b = domain_checkpoint(tmp_path / "b3", DOMAIN_A, tokenizer=_retrained_tokenizer())
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    _, first, controller, _ = _switch_across_tokenizers(domain_models, b, params)
    before, after = first.prefix_text, controller.active.engine.outputs.text(first.seq)
    stop = before[-2:] + after[:2]  # begins in a's text, ends in b's
    assert len(before) >= 2 and len(after) >= 2 and stop not in before and stop not in before + after[:1]
    request, cseq, _, snapshots = _switch_across_tokenizers(
        domain_models, b, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=[stop]))
    final = request.output().outputs[0]
    assert cseq.prefix_text == before  # the same run up to the switch
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == (before + after)[:(before + after).find(stop)]
    assert len(final.text) < len(before)  # the cut falls in the text generated before the switch
    assert all(final.text.startswith(s) for s in snapshots)  # the held-back tail was never streamed


def test_a_conversation_is_rendered_with_the_chat_template_of_the_model_serving_it(tmp_path, monkeypatch):
    a_tokenizer, b_tokenizer = make_tokenizer(), _retrained_tokenizer()
    a_tokenizer.chat_template = "A|{% for m in messages %}{{ m['content'] }}{% endfor %}|"
    b_tokenizer.chat_template = "B|{% for m in messages %}{{ m['content'] }}{% endfor %}|"
    a = domain_checkpoint(tmp_path / "a", DOMAIN_A, tokenizer=a_tokenizer)
    b = domain_checkpoint(tmp_path / "b", DOMAIN_A, tokenizer=b_tokenizer)
    seen: list[tuple[str, object]] = []
    original = LLMEngine.make_request

    def make_request(self, prompt, params):
        seen.append((str(self.source.path), prompt))
        return original(self, prompt, params)

    monkeypatch.setattr(LLMEngine, "make_request", make_request)
    llm = LLM([a, b], slo=SLO(**SMALL_SLO), kv_cache_blocks=64)
    conversations = [[{"role": "user", "content": text}] for text in DOMAIN_A * 2]
    outputs = llm.chat(conversations, GREEDY, use_tqdm=False) + llm.chat(conversations, GREEDY, use_tqdm=False)
    assert all(o.finished and len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in outputs)
    on_b = [prompt for path, prompt in seen if path == str(b)]
    assert on_b and all(p["prompt"].startswith("B|") for p in on_b)  # b's profile requests: b's own template
    assert all(p["prompt_token_ids"] == b_tokenizer.encode(p["prompt"], add_special_tokens=False) for p in on_b)
    assert all(p["prompt"].startswith("A|") for path, p in seen if path == str(a))


def _retrained_tokenizer():
    return make_tokenizer([" ".join(DOMAIN_B) * 6, "numbers letters code"], vocab_size=280)


def test_stream_and_several_samples_survive_a_switch(domain_models):
    llm = LLM([domain_models["a"], domain_models["b"]], slo=SLO(**SMALL_SLO), kv_cache_blocks=64)
    _profile_every_candidate(llm)
    controller = llm.engine
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    stream = llm.stream("The quick brown fox", params)
    pieces = list(itertools.islice(stream, 2))
    sampled = controller.make_request("She sells sea shells", SamplingParams(n=3, temperature=1.0, seed=7,
                                                                             max_tokens=16, ignore_eos=True))
    controller.add_request(sampled)
    controller.step()
    target = next(p for p in controller._plans() if p.model == str(domain_models["b"]))
    controller._deploy(target)
    pieces += list(stream)
    while controller.has_unfinished():
        controller.step()
    out = sampled.output()
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 16 and c.finish_reason == "length" for c in out.outputs)
    assert all(s.models == [str(domain_models["a"]), str(domain_models["b"])] for s in sampled.seqs)
    switch = [e for e in controller.events.events if e.kind == "switch"][-1]
    assert switch.data["moved"] == 2 and "by token ids" in switch.reason  # the stream's request and the sampled one
    # the stream ran to its end across the switch (b continues domain-A text with <unk>, which decodes to nothing)
    assert "".join(pieces).startswith("The") and not controller.requests
    engine = controller.active.engine
    assert engine.kv_cache.allocator.num_free == engine.kv_cache.num_blocks


def test_a_failed_load_is_an_event_and_serving_goes_on(domain_models, monkeypatch):
    llm = LLM([domain_models["a"], domain_models["b"]], slo=SLO(**SMALL_SLO), kv_cache_blocks=64)
    _profile_every_candidate(llm)
    controller = llm.engine
    before = (controller.active.model, controller.active.plan.depth)

    def broken(*args, **kwargs):
        raise OSError("disk unplugged")

    monkeypatch.setattr(controller.active.engine.model, "grow", broken)
    monkeypatch.setattr(controller, "_build", broken)
    outputs = llm.generate(DOMAIN_B * 2, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                           use_tqdm=False)
    assert all(o.finished and len(o.outputs[0].token_ids) == 30 for o in outputs)
    failures = [e for e in controller.events.events if e.kind == "failure"]
    assert failures and "disk unplugged" in failures[0].reason
    assert (controller.active.model, controller.active.plan.depth) == before


def test_set_slo_reprofiles_and_events_reach_the_logger(domain_models, caplog):
    llm = LLM(domain_models["a"], slo=SLO(**SMALL_SLO), kv_cache_blocks=64)
    with caplog.at_level("INFO", logger="helios.control"):
        llm.generate(DOMAIN_A, GREEDY, use_tqdm=False)
        llm.set_slo(SLO(**{**SMALL_SLO, "objective": "memory"}))
        assert llm.engine.profiling is None  # the round's first profile starts with the next request
        llm.engine.add_request(llm.engine.make_request(DOMAIN_A[0], GREEDY))
        # beside the deployment, the profiling engine's pool holds only its profile requests, not a second budget
        profiling = llm.engine.profiling.engine
        assert profiling.kv_cache.num_blocks == SMALL_SLO["profile_requests"] * -(-profiling.max_model_len // 16) < 64
        llm.generate(DOMAIN_A, GREEDY, use_tqdm=False)
    reasons = [e["reason"] for e in llm.stats()["events"] if e["kind"] == "reassess"]
    assert reasons == ["cold start", "the SLO changed"]
    assert llm.stats()["control"]["slo"]["objective"] == "memory"
    assert any("select" in r.getMessage() for r in caplog.records)


def test_requests_arriving_during_a_round_do_not_count_toward_the_next(domain_models):
    llm = LLM([domain_models["a"], domain_models["b"]], slo=SLO(**{**SMALL_SLO, "reprofile_interval": 3}),
              kv_cache_blocks=64)
    # both rounds' profiles take 2 requests each; the other 20 arrive while the round is underway
    for _ in range(2):
        assert all(o.finished for o in llm.generate(DOMAIN_A * 4, GREEDY, use_tqdm=False))
    reasons = lambda: [e["reason"] for e in llm.stats()["events"] if e["kind"] == "reassess"]  # noqa: E731
    assert len(llm.stats()["control"]["pht"]) == 2 and reasons() == ["cold start"]
    llm.generate(DOMAIN_A[:2], GREEDY, use_tqdm=False)
    assert reasons() == ["cold start"]
    llm.generate(DOMAIN_A[:1], GREEDY, use_tqdm=False)  # the third request after the selection starts the next round
    assert reasons() == ["cold start", "3 requests since the last profile (RI)"]


def test_breaches_at_the_truncated_depth_are_tokens_below_its_threshold(peaked_checkpoints):
    from helios.exits.config import ExitPolicy

    plain = LLMEngine(EngineConfig(peaked_checkpoints["llama"], num_layers=3, kv_cache_blocks=64))
    gated = LLMEngine(EngineConfig(peaked_checkpoints["llama"], num_layers=3, kv_cache_blocks=64))
    gated.set_exit_policy(ExitPolicy("max_prob", (3,), {3: 0.6}))
    outs = []
    for engine in (plain, gated):
        requests = [engine.make_request(p, GREEDY) for p in DOMAIN_A + DOMAIN_B]
        for r in requests:
            engine.add_request(r)
        while engine.has_unfinished():
            engine.step()
        outs.append([engine.output(r).outputs[0] for r in requests])
    confidences = [c for o in outs[1] for c in o.confidences]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]  # the breach test changes no token
    assert confidences == pytest.approx([c for o in outs[0] for c in o.confidences], abs=1e-5)
    assert gated.num_breaches == sum(c < 0.6 for c in confidences) and 0 < gated.num_breaches < len(confidences)
