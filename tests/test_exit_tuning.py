"""Exit tuning and calibration on tiny checkpoints: corpus windows, teacher-forced hidden states, training lowers
held-out KL, thresholds meet the target precision, the runtime serves what calibration wrote, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from helios import LLM, ExitConfig, SamplingParams
from helios.cli import main
from helios.exits.heads import ExitHeads
from helios.tuning.calibration import ExitStats, calibrate_exits, choose_thresholds, exit_report
from helios.tuning.corpus import _fair_shares, batches, read_documents, token_windows
from helios.tuning.tune import sample_states, tune_exits
from tests.conftest import PROMPTS

WORDS = ("the of and to in is was for on that with as fox time water boils sea shells numbers one two three "
         "she he it they we you add def return upon there once quick brown jumps over lazy dog").split()


def write_corpus(path, seed, sentences=120):
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(sentences):
        picks = torch.randint(0, len(WORDS), (int(torch.randint(6, 14, (1,), generator=g)),), generator=g)
        lines.append(" ".join(WORDS[i] for i in picks) + ".")
    path.write_text(" ".join(PROMPTS) + "\n" + "\n".join(lines))
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root / "train.txt", 0, 400), write_corpus(root / "heldout.txt", 1, 120)


# ---- corpus -------------------------------------------------------------------------------------------------

def test_documents_from_text_jsonl_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text('{"question": "Q?", "answer": "A.", "id": 3}\n\n{"text": "T"}\n"S"\n')
    (tmp_path / "c.json").write_text('[{"document": "D"}, "E"]')
    assert list(read_documents(tmp_path / "a.txt")) == ["plain text"]
    assert list(read_documents(tmp_path / "b.jsonl")) == ["Q?\n\nA.", "T", "S"]
    assert list(read_documents(tmp_path / "c.json")) == ["D", "E"]
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(read_documents(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_documents(tmp_path / "missing.txt"))


def test_fair_shares_give_unused_budget_to_longer_sources():
    assert _fair_shares([1000, 1000], 600) == [300, 300]
    assert _fair_shares([100, 1000, 1000], 900) == [100, 400, 400]
    assert _fair_shares([50, 60], 1000) == [50, 60]


def test_token_windows_mix_sources_within_budget(checkpoints, corpora):
    tokenizer = LLM(checkpoints["llama"], kv_cache_blocks=16).get_tokenizer()
    windows = token_windows(tokenizer, list(corpora), max_tokens=1000, seq_len=64)
    sizes = [len(w) for w in windows]
    assert max(sizes) <= 64 and min(sizes) >= 16 and 900 <= sum(sizes) <= 1000
    assert windows != token_windows(tokenizer, list(corpora), 1000, 64, seed=1)  # shuffled by seed
    assert [len(g) for g in batches([[0] * 10] * 5, 25)] == [2, 2, 1]
    with pytest.raises(ValueError, match="seq_len"):
        token_windows(tokenizer, list(corpora), 1000, 8)


# ---- teacher-forced hidden states ------------------------------------------------------------------------------

def test_hidden_states_of_a_batch_equal_one_window_at_a_time(checkpoints):
    llm = LLM(checkpoints["qwen2"], kv_cache_blocks=64)
    tok = llm.get_tokenizer()
    windows = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    together = llm.engine.hidden_states(windows, [2, 4])
    start = 0
    for w in windows:
        alone = llm.engine.hidden_states([w], [2, 4])
        for layer in (2, 4):
            torch.testing.assert_close(together[layer][start:start + len(w)], alone[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(llm.engine.model.compute_logits(alone[4]), llm.engine.prompt_logits(w))
        start += len(w)
    with pytest.raises(ValueError, match="1..4"):
        llm.engine.hidden_states(windows, [5])
    with pytest.raises(ValueError, match="at least one window"):
        llm.engine.hidden_states([], [2])
    assert llm.engine.kv_cache.allocator.num_free == 64  # every block handed back


def test_sampled_states_are_rows_of_the_full_forward(checkpoints):
    llm = LLM(checkpoints["qwen2"], kv_cache_blocks=64)
    tok = llm.get_tokenizer()
    windows = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    states = llm.engine.hidden_states(windows, [2, 4])
    full = sample_states(llm.engine, windows, [2], 1.0, torch.Generator().manual_seed(0), "", progress=False)
    torch.testing.assert_close(full.exits[2], states[2])
    torch.testing.assert_close(full.final, llm.engine.model.head_input(states[4]))
    half = sample_states(llm.engine, windows, [2], 0.5, torch.Generator().manual_seed(0), "", progress=False)
    n = states[2].shape[0]
    assert len(half) == round(n * 0.5) and half.exits[2].shape == (len(half), states[2].shape[1])
    # every kept row is the state of one position, and its teacher input is that same position's
    match = (half.exits[2][:, None, :] - states[2][None, :, :]).abs().amax(-1) < 1e-6
    assert match.sum(1).eq(1).all()
    positions = match.float().argmax(1)
    torch.testing.assert_close(half.final, full.final[positions])
    assert len(set(positions.tolist())) == len(half)


def test_epochs_reuse_one_frozen_forward(peaked_checkpoints, corpora, monkeypatch):
    from helios.engine.engine import LLMEngine

    calls = []
    original = LLMEngine.hidden_states
    monkeypatch.setattr(LLMEngine, "hidden_states", lambda self, w, layers: calls.append(len(w)) or
                        original(self, w, layers))
    options = dict(eval_corpus=[corpora[1]], max_tokens=1500, eval_tokens=300, seq_len=64, batch_tokens=128,
                   progress=False)
    heads = tune_exits(peaked_checkpoints["llama"], [corpora[0]], [2], epochs=1, **options)
    one_epoch = len(calls)
    calls.clear()
    heads3 = tune_exits(peaked_checkpoints["llama"], [corpora[0]], [2], epochs=3, **options)
    assert len(calls) == one_epoch and sum(calls) > 0
    assert heads3.info["training"]["sampled_positions"] == heads.info["training"]["sampled_positions"]
    assert not torch.equal(heads3.adapters[2].weight, heads.adapters[2].weight)  # more steps, other weights


# ---- tuning ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned(peaked_checkpoints, corpora, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "llama"
    heads = tune_exits(peaked_checkpoints["llama"], [corpora[0]], [1, 2], out, eval_corpus=[corpora[1]],
                       max_tokens=3000, eval_tokens=800, seq_len=64, batch_tokens=256, lr=1e-2, progress=False)
    return heads, out


def test_tuning_lowers_held_out_kl_and_records_it(tuned, peaked_checkpoints):
    heads, out = tuned
    per_exit = heads.info["held_out"]["per_exit"]
    for layer in ("1", "2"):
        assert per_exit[layer]["kl_after"] < 0.8 * per_exit[layer]["kl_before"]
    assert heads.info["training"]["tokens"] > 2500 and heads.info["held_out"]["separate_files"]
    # the adapters moved away from identity, and what was saved is what was returned
    loaded = ExitHeads.load(out)
    assert loaded.layers == [1, 2] and loaded.info == json.loads(json.dumps(heads.info))
    for layer in (1, 2):
        assert not torch.allclose(loaded.adapters[layer].weight, torch.eye(48))
        assert torch.equal(loaded.adapters[layer].weight, heads.adapters[layer].weight)
    loaded.check_model(LLM(peaked_checkpoints["llama"], kv_cache_blocks=16).engine.model, out)


def test_tuning_rejects_bad_arguments(peaked_checkpoints, corpora):
    path = peaked_checkpoints["llama"]
    with pytest.raises(ValueError, match="outside 1..3"):
        tune_exits(path, [corpora[0]], [4], max_tokens=500, progress=False)
    with pytest.raises(ValueError, match="sample_fraction"):
        tune_exits(path, [corpora[0]], [1], max_tokens=500, sample_fraction=0, progress=False)
    with pytest.raises(ValueError, match="whole model"):
        tune_exits(LLM(path, num_layers=2, kv_cache_blocks=64), [corpora[0]], [1], max_tokens=500, progress=False)


# ---- calibration -----------------------------------------------------------------------------------------------

def brute_force_thresholds(stats: ExitStats, target: float, min_exits: int):
    """Tries every distinct score as the cut, exits in order (the oracle for choose_thresholds)."""
    remaining = torch.ones(stats.num_tokens, dtype=torch.bool)
    chosen = {}
    for layer in stats.layers:
        score, agree = stats.score(layer), stats.agree[layer]
        best = None
        for cut in sorted(set(score[remaining].tolist())):
            leaving = remaining & (score >= cut)
            n = int(leaving.sum())
            if n >= min_exits and int((leaving & agree).sum()) / n >= target:
                best = cut
                break
        chosen[layer] = None if best is None else (-best if stats.confidence == "entropy" else best)
        if best is not None:
            remaining &= ~(score >= best)
    return chosen


@pytest.mark.parametrize("confidence", ["max_prob", "entropy"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_are_the_lowest_meeting_the_target_exit_by_exit(confidence, seed):
    g = torch.Generator().manual_seed(seed)
    n = 400
    values, agree = {}, {}
    for layer, skill in ((3, 0.5), (6, 0.8), (9, 1.2)):
        conf = torch.rand(n, generator=g)
        conf = (conf * 20).round() / 20  # ties, as real confidences have
        agree[layer] = torch.rand(n, generator=g) < conf * skill
        values[layer] = 3 * (1 - conf) if confidence == "entropy" else conf
    stats = ExitStats(confidence, values, agree)
    for target in (0.7, 0.9, 0.99):
        thresholds = choose_thresholds(stats, target, min_exits=20)
        assert thresholds == pytest.approx(brute_force_thresholds(stats, target, 20))
        report = exit_report(stats, thresholds)
        for layer, row in report["per_exit"].items():
            if thresholds[layer] is not None:
                assert row["precision"] >= target and row["exits"] >= 20
        assert report["early_exit_rate"] == pytest.approx(sum(r["exit_rate"] for r in report["per_exit"].values()),
                                                          abs=1e-3)
    assert choose_thresholds(stats, 1.0, min_exits=n)[3] is None  # unreachable: the exit is switched off


def test_calibration_writes_thresholds_the_runtime_serves(tuned, peaked_checkpoints, corpora):
    heads, out = tuned
    report = calibrate_exits(peaked_checkpoints["llama"], out, [corpora[1]], 0.8, max_tokens=1500, seq_len=64,
                             batch_tokens=256, min_exits=10, progress=False)
    loaded = ExitHeads.load(out)
    assert loaded.confidence == "max_prob" and loaded.info["calibration"]["target_precision"] == 0.8
    assert loaded.info["held_out"] == heads.info["held_out"]  # tuning notes kept
    on = {layer: t for layer, t in loaded.thresholds.items() if t is not None}
    assert on, "expected at least one exit to reach precision 0.8 on this model"
    for layer, threshold in on.items():
        row = report["per_exit"][layer]
        assert row["threshold"] == pytest.approx(threshold) and row["precision"] >= 0.8
    llm = LLM(peaked_checkpoints["llama"], kv_cache_blocks=256, early_exit=ExitConfig(heads=out))
    policy = llm.engine.exit_policy
    assert set(policy.layers) == set(on) | {4}  # switched-off exits are not checked
    for layer, threshold in on.items():
        assert policy.thresholds[layer] == pytest.approx(threshold)
    for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False):
        for layer, conf in zip(o.outputs[0].exit_layers, o.outputs[0].confidences, strict=True):
            assert layer == 4 or conf >= on[layer]


def test_cli_tunes_and_calibrates(peaked_checkpoints, corpora, tmp_path, capsys):
    model, out = str(peaked_checkpoints["opt"]), str(tmp_path / "opt_heads")
    assert main(["tune-exits", "--model", model, "--corpus", str(corpora[0]), "--layers", "2,3", "--out", out,
                 "--max-tokens", "1200", "--eval-tokens", "300", "--seq-len", "64", "--batch-tokens", "256",
                 "--ce-weight", "0", "--distill", "candidates", "--top-k", "8", "--tail-samples", "64"]) == 0
    printed = capsys.readouterr().out
    assert "exit layer" in printed and "helios calibrate" in printed
    heads = ExitHeads.load(out)
    assert heads.layers == [2, 3] and heads.adapters[2].norm_weight is not None
    assert heads.info["training"]["distill"] == "candidates" and heads.info["training"]["tail_samples"] == 64
    assert not heads.info["held_out"]["separate_files"]
    assert main(["calibrate", "--model", model, "--heads", out, "--corpus", str(corpora[1]),
                 "--target-precision", "0.9", "--max-tokens", "800", "--min-exits", "5"]) == 0
    assert "thresholds written" in capsys.readouterr().out
    assert ExitHeads.load(out).thresholds is not None
    with pytest.raises(SystemExit):
        main(["tune-exits", "--model", model, "--corpus", str(corpora[0]), "--layers", "2,x", "--out", out])
    assert main(["tune-exits", "--model", model, "--corpus", str(tmp_path / "none.txt"), "--layers", "2",
                 "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tuning_an_llm_with_a_small_kv_cache_uses_smaller_forwards(peaked_checkpoints, corpora):
    options = dict(eval_corpus=[corpora[1]], max_tokens=800, eval_tokens=200, seq_len=64, progress=False)
    small = LLM(peaked_checkpoints["llama"], dtype="float32", kv_cache_blocks=12, block_size=16)  # 96 tokens
    heads = tune_exits(small, [corpora[0]], [2], **options)
    assert heads.info["training"]["tokens"] > 600
    assert small.engine.kv_cache.allocator.num_free == 12  # every block handed back
    tiny = LLM(peaked_checkpoints["llama"], dtype="float32", kv_cache_blocks=6, block_size=16)
    with pytest.raises(ValueError, match="kv_cache_blocks"):
        tune_exits(tiny, [corpora[0]], [2], **options)


@pytest.mark.parametrize("separate_eval", [True, False])
def test_max_tokens_is_what_training_gets_with_or_without_eval_corpus(checkpoints, corpora, separate_eval):
    from helios.tuning.tune import TuneConfig, _split_windows

    tokenizer = LLM(checkpoints["llama"], kv_cache_blocks=16).get_tokenizer()
    config = TuneConfig(layers=[1], max_tokens=700, eval_tokens=300, seq_len=64)  # the file holds more than both
    eval_corpus = [corpora[1]] if separate_eval else None
    train, held = _split_windows(tokenizer, [corpora[0]], eval_corpus, config)
    assert sum(len(w) for w in train) == 700
    assert 280 <= sum(len(w) for w in held) <= 300
    if not separate_eval:  # held back from the same file, never trained on
        assert not {tuple(w) for w in held} & {tuple(w) for w in train}


def test_take_tokens_cuts_exactly():
    from helios.tuning.corpus import take_tokens

    taken, rest = take_tokens([[1] * 10, [2] * 10, [3] * 10], 15)
    assert taken == [[1] * 10, [2] * 5] and rest == [[2] * 5, [3] * 10]
    assert take_tokens([[1] * 10, [2] * 10], 10) == ([[1] * 10], [[2] * 10])
    assert take_tokens([[1] * 4], 10) == ([[1] * 4], [])


# ---- candidate distillation (large vocabularies) ----------------------------------------------------------------

def test_candidates_covering_the_vocabulary_equal_full_distillation():
    """With every token a candidate (no tail), the candidate loss and its gradient are the full-vocabulary ones."""
    from helios.tuning.distill import distill, teacher_targets
    from helios.tuning.sampled_distill import candidates, student_loss, teacher_probs, topk_teacher

    g = torch.Generator().manual_seed(0)
    vocab, dim, rows = 97, 24, 13
    head = torch.randn(vocab, dim, generator=g)
    x_final, x = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    teacher = topk_teacher(lambda h: h @ head.T, x_final, vocab)
    cand = candidates(teacher.top, head, 50, g)
    assert cand.weights.shape[0] == vocab and cand.sample_weights.shape[0] == 0
    p, p_tail = teacher_probs(x_final, teacher.lse, cand)
    student = x.clone().requires_grad_(True)
    loss, stats = student_loss(student, p, p_tail, cand, ce_weight=2.0)
    loss.backward()
    full = distill(x, head, teacher_targets(x_final, head), ce_weight=2.0)
    assert stats["kl"] == pytest.approx(full.kl, rel=1e-4) and stats["ce"] == pytest.approx(full.ce, rel=1e-4)
    assert stats["agree"] == full.agree
    torch.testing.assert_close(student.grad, full.grad, atol=1e-5, rtol=1e-4)


def test_sampled_tail_estimates_the_students_tail_mass():
    from helios.tuning.sampled_distill import candidates

    g = torch.Generator().manual_seed(1)
    vocab, dim = 5000, 16
    head = torch.randn(vocab, dim, generator=g) * 0.25  # logits of std ~1: the tail has no dominant token
    x = torch.randn(1, dim, generator=g)
    top = torch.arange(40)[None]  # C = tokens 0..39
    true_tail = torch.logsumexp((x @ head.T)[0, 40:], 0)
    estimates = []
    for _ in range(30):
        cand = candidates(top, head, 1000, g)
        estimates.append(torch.logsumexp((x @ cand.sample_weights.T)[0], 0) + cand.log_tail_scale)
    assert torch.stack(estimates).exp().mean().log() == pytest.approx(true_tail.item(), abs=0.05)


def test_candidate_tuning_lowers_held_out_kl(peaked_checkpoints, corpora):
    heads = tune_exits(peaked_checkpoints["llama"], [corpora[0]], [1, 2], eval_corpus=[corpora[1]],
                       max_tokens=3000, eval_tokens=800, seq_len=64, batch_tokens=256, lr=1e-2, progress=False,
                       distill="candidates", top_k=8, tail_samples=64)
    per_exit = heads.info["held_out"]["per_exit"]
    for layer in ("1", "2"):
        assert per_exit[layer]["kl_after"] < 0.8 * per_exit[layer]["kl_before"]
    assert heads.info["training"]["distill"] == "candidates" and heads.info["training"]["top_k"] == 8
