"""The engine API a vLLM user expects: streams that survive other callers, abort, threads, n, logprobs, penalties,
chat, token prompts, vLLM's constructor names; each defect found by a user has its regression test here."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from helios import LLM, ExitConfig, SamplingParams
from tests.conftest import PROMPTS, hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=256)


def text_of(llm, prompt, params=GREEDY) -> str:
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


def assert_idle(llm):
    stats = llm.stats()
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


# ---- streams (defect 1) and abort (defect 2) ------------------------------------------------------------------

def test_stream_keeps_its_text_when_generate_runs_in_between(llm):
    want = text_of(llm, PROMPTS[3])
    stream = llm.stream(PROMPTS[3], GREEDY)
    pieces = [next(stream)]
    llm.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    pieces += list(stream)  # its request finished inside generate(): the rest must still come out
    assert "".join(pieces) == want
    assert_idle(llm)


def test_two_interleaved_streams_each_yield_their_whole_text(llm):
    want = [text_of(llm, PROMPTS[0]), text_of(llm, PROMPTS[5], SamplingParams(temperature=0, max_tokens=13))]
    streams = [llm.stream(PROMPTS[0], GREEDY), llm.stream(PROMPTS[5], SamplingParams(temperature=0, max_tokens=13))]
    got = ["", ""]
    live = [0, 1]
    while live:
        for i in list(live):
            try:
                got[i] += next(streams[i])
            except StopIteration:
                live.remove(i)
    assert got == want
    assert_idle(llm)


def test_closed_or_dropped_stream_aborts_its_request(llm):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    stream = llm.stream(PROMPTS[1], long)
    next(stream)
    assert llm.engine.has_unfinished()
    stream.close()
    assert_idle(llm)
    stream = llm.stream(PROMPTS[2], long)
    next(stream)
    del stream
    gc.collect()
    assert_idle(llm)
    never_started = llm.stream(PROMPTS[2], long)  # validated, but nothing is queued before the first next()
    assert not llm.engine.has_unfinished()
    del never_started


def test_interrupted_generate_aborts_what_it_queued(llm, monkeypatch):
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    real_step, calls = llm.engine.step, []

    def step_then_interrupt():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(llm.engine, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert_idle(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want


def test_abort_by_request_id_from_another_thread(llm, monkeypatch):
    # the worker's first step waits until both requests are aborted: otherwise a short generation can finish first
    real_step, aborted = llm.engine.step, threading.Event()

    def step_after_abort():
        aborted.wait(timeout=60)
        return real_step()

    monkeypatch.setattr(llm.engine, "step", step_after_abort)
    results = {}
    worker = threading.Thread(target=lambda: results.setdefault("out", llm.generate(
        PROMPTS[:2], SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True), use_tqdm=False)))
    worker.start()
    while len(llm.engine.requests) < 2 and worker.is_alive():
        time.sleep(0.001)
    for request_id in list(llm.engine.requests):
        llm.abort(request_id)
    aborted.set()
    worker.join(timeout=60)
    monkeypatch.undo()
    assert not worker.is_alive()
    assert [o.outputs[0].finish_reason for o in results["out"]] == ["abort", "abort"]
    assert all(len(o.outputs[0].token_ids) < 1500 for o in results["out"])
    assert_idle(llm)
    llm.abort("no-such-request")  # ignored


def test_abort_of_a_request_still_waiting_for_the_batch(checkpoints):
    one_at_a_time = LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=64, max_num_seqs=1)
    engine = one_at_a_time.engine
    first, second = (engine.make_request(p, GREEDY) for p in PROMPTS[:2])
    engine.add_request(first)
    engine.add_request(second)
    engine.step()  # only the first runs; the second waits for a slot
    assert second.seqs[0] in engine.scheduler.waiting
    assert engine.abort(second.request_id)
    assert second.seqs[0].finish_reason == "abort" and not engine.scheduler.waiting
    while engine.has_unfinished():
        engine.step()
    assert first.seqs[0].finish_reason == "length"
    assert_idle(one_at_a_time)


def test_one_llm_serves_two_threads(llm):
    prompts = [PROMPTS[:4], PROMPTS[4:]]
    want = [[o.outputs[0].token_ids for o in llm.generate(p, GREEDY, use_tqdm=False)] for p in prompts]
    got = [None, None]

    def run(i):
        got[i] = [o.outputs[0].token_ids for o in llm.generate(prompts[i], GREEDY, use_tqdm=False)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    streamed = "".join(llm.stream(PROMPTS[6], GREEDY))  # a third caller in this thread, at the same time
    for t in threads:
        t.join(timeout=120)
    assert got == want
    assert streamed == text_of(llm, PROMPTS[6])
    assert_idle(llm)


# ---- SamplingParams (defect 5) --------------------------------------------------------------------------------

def test_mutated_sampling_params_are_checked(llm):
    params = SamplingParams(temperature=0.7, max_tokens=5)
    with pytest.raises(ValueError, match="temperature"):
        params.temperature = -1
    with pytest.raises(ValueError, match="top_p"):
        params.top_p = 1.5
    assert params.temperature == 0.7 and params.top_p == 1.0  # the bad values were refused
    params.temperature = 0.0  # a valid change is fine
    assert params.greedy
    params.stop = ["x"]
    params.stop.append("")  # in-place mutation escapes __setattr__; the engine checks again at use
    with pytest.raises(ValueError, match="stop"):
        llm.generate(PROMPTS[0], params, use_tqdm=False)
    assert_idle(llm)


def test_a_request_keeps_the_params_it_was_given(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    stream = llm.stream(PROMPTS[0], params)
    first = next(stream)
    params.max_tokens = 2  # changing the object afterwards does not reach the running request
    text = first + "".join(stream)
    assert text == text_of(llm, PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))


# ---- n, logprobs, penalties, stopping -------------------------------------------------------------------------

def test_n_samples_share_prompt_blocks_and_are_independent(checkpoints):
    llm = LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=256, block_size=4)
    prompt = {"prompt_token_ids": list(range(10, 50))}  # 10 full blocks
    greedy = llm.generate(prompt, SamplingParams(n=4, temperature=0, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)[0]
    assert [o.index for o in greedy.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in greedy.outputs}) == 1  # temperature 0: identical
    sampled = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=3, ignore_eos=True),
                           use_tqdm=False)[0]
    assert len({tuple(o.token_ids) for o in sampled.outputs}) == 4  # seeds 3, 4, 5, 6: different draws
    again = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=3, ignore_eos=True),
                         use_tqdm=False)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in sampled.outputs]

    def blocks_after_prefill(engine, requests):
        engine.reset_prefix_cache()
        for r in requests:
            engine.add_request(r)
        engine.step()
        used = engine.kv_cache.num_blocks - engine.kv_cache.allocator.num_free
        for r in requests:
            engine.abort(r.request_id)
        return used

    params = SamplingParams(n=4, temperature=0, max_tokens=8)
    shared = blocks_after_prefill(llm.engine, [llm.engine.make_request(prompt, params)])
    alone = LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=256, block_size=4, enable_prefix_caching=False)
    separate = blocks_after_prefill(alone.engine, [alone.engine.make_request(prompt, SamplingParams(max_tokens=8))
                                                   for _ in range(4)])
    # 40 prompt tokens = 10 blocks each when separate; the samples after the first share 9 and compute the last
    assert separate == 4 * 10 and shared == 10 + 3 * 1


def test_logprobs_equal_transformers_log_softmax(checkpoints, llm):
    ref = hf_model(checkpoints["llama"])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    for o in out:
        completion = o.outputs[0]
        ids = o.prompt_token_ids + completion.token_ids
        with torch.no_grad():
            log_probs = ref(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        n = len(o.prompt_token_ids)
        assert len(completion.logprobs) == 6
        for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
            row = log_probs[n - 1 + step]
            assert token in entry and entry[token].rank == 1  # greedy: the chosen token is the most likely
            top = row.topk(3)
            assert sorted(entry) == sorted(top.indices.tolist())
            for t, lp in entry.items():
                assert lp.logprob == pytest.approx(row[t].item(), abs=1e-4)
                assert lp.decoded_token == llm.get_tokenizer().decode([t])
        assert completion.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(
            completion.token_ids, completion.logprobs, strict=True)))
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == n
        for pos in range(1, n):
            entry, actual = o.prompt_logprobs[pos], o.prompt_token_ids[pos]
            assert actual in entry and len(entry) <= 3
            assert entry[actual].logprob == pytest.approx(log_probs[pos - 1, actual].item(), abs=1e-4)


def test_logprobs_come_from_the_exit_that_chose_the_token(checkpoints):
    exits = LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=64,
                early_exit=ExitConfig(layers=[2], threshold=0.0))  # every token leaves at layer 2
    out = exits.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=1),
                         use_tqdm=False)[0]
    cut = hf_model(checkpoints["llama"], num_layers=2)
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.no_grad():
        log_probs = cut(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    assert out.outputs[0].exit_layers == [2] * 5
    for step, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True)):
        assert entry[token].logprob == pytest.approx(log_probs[len(out.prompt_token_ids) - 1 + step, token].item(),
                                                     abs=1e-4)


def vllm_penalties(logits, prompt, output, repetition, frequency, presence):
    """vLLM's definitions (model_executor/layers/utils.py: apply_penalties), written out in plain torch."""
    vocab = logits.shape[0]
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[torch.tensor(prompt + output, dtype=torch.long)] = True
    counts = torch.zeros(vocab)
    for t in output:
        counts[t] += 1
    scale = torch.where(seen, torch.tensor(repetition), torch.tensor(1.0))
    logits = torch.where(logits > 0, logits / scale, logits * scale)
    return logits - frequency * counts - presence * (counts > 0).float()


@pytest.mark.parametrize("repetition, frequency, presence", [(1.3, 0.0, 0.0), (1.0, 0.7, 0.0), (1.0, 0.0, -0.5),
                                                             (0.8, 0.4, 1.1)])
def test_penalties_equal_vllm_definitions(repetition, frequency, presence):
    from helios.engine.sampler import apply_penalties

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, generator=g) * 3
    prompt = torch.randint(0, 300, (20,), generator=g).tolist()
    output = torch.randint(0, 300, (15,), generator=g).tolist() + [7, 7, 7]
    got = apply_penalties(logits, prompt, output, repetition, frequency, presence)
    torch.testing.assert_close(got, vllm_penalties(logits, prompt, output, repetition, frequency, presence))


def test_min_p_top_k_top_p_and_min_tokens_filters():
    from helios.engine.sampler import filter_logits, process_row
    from helios.engine.sequence import Sequence

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    probs = logits.softmax(-1)
    kept = filter_logits(logits, -1, 1.0, min_p=0.3).isfinite()
    assert kept.tolist() == (probs >= 0.3 * probs.max()).tolist()
    assert filter_logits(logits, 2, 1.0, 0.0).isfinite().tolist() == [True, True, False, False, False]
    assert filter_logits(logits, -1, 0.7, 0.0).isfinite().sum() == int((probs.cumsum(0) - probs < 0.7).sum())
    seq = Sequence("r", None, [1, 2], SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3]))
    row = process_row(logits, seq, {0})
    assert row[0] == row[3] == float("-inf") and row[1] == 1.0  # EOS and stop token banned before min_tokens


def test_repetition_penalty_greedy_equals_transformers(checkpoints, llm):
    ref = hf_model(checkpoints["llama"])
    out = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                   repetition_penalty=1.5), use_tqdm=False)
    for o in out:
        ids = torch.tensor([o.prompt_token_ids])
        with torch.no_grad():
            want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                                do_sample=False, repetition_penalty=1.5)[0, ids.shape[1]:].tolist()
        assert o.outputs[0].token_ids == want


def test_stop_options(llm):
    base = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    needle = base.text[len(base.text) // 2: len(base.text) // 2 + 2]
    cut = base.text.find(needle)
    kept = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=16, stop=needle,
                                                   include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == base.text[: cut + len(needle)] and kept.stop_reason == needle
    late = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[base.token_ids[1]],
                                                   min_tokens=4), use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) >= 4  # the stop token at position 2 did not count before min_tokens


def test_min_tokens_keeps_eos_away(checkpoints, llm, tmp_path):
    """A copy of the tiny model whose EOS is a token greedy decoding emits early, so EOS really comes."""
    import json
    import shutil

    base = llm.generate(PROMPTS[4], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    eos = base[2]
    shutil.copytree(checkpoints["llama"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["eos_token_id"] = eos
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    model = LLM(tmp_path / "m", dtype="float32", kv_cache_blocks=64)
    plain = model.generate(PROMPTS[4], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert plain.token_ids == base[:3] and plain.finish_reason == "stop"
    held = model.generate(PROMPTS[4], SamplingParams(temperature=0, max_tokens=12, min_tokens=8),
                          use_tqdm=False)[0].outputs[0]
    assert eos not in held.token_ids[:8] and len(held.token_ids) >= 8


def test_max_tokens_none_runs_to_the_context_limit(checkpoints):
    llm = LLM(checkpoints["llama"], dtype="float32", kv_cache_blocks=32, max_model_len=40)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 40
    assert out.outputs[0].finish_reason == "length"


def test_skip_special_tokens_false_shows_them(llm):
    out = llm.generate({"prompt_token_ids": [1, 50, 60]}, SamplingParams(temperature=0, max_tokens=4,
                                                                         skip_special_tokens=False,
                                                                         stop_token_ids=[]), use_tqdm=False)
    ids = out[0].outputs[0].token_ids
    assert out[0].outputs[0].text == llm.get_tokenizer().decode(ids, skip_special_tokens=False)


def test_token_id_list_prompts_equal_their_text(llm):
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS[:3]]
    by_text = llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False)
    by_lists = llm.generate(ids, GREEDY, use_tqdm=False)
    single = llm.generate(ids[0], GREEDY, use_tqdm=False)  # one prompt as a plain list of ids
    assert [o.outputs[0].token_ids for o in by_lists] == [o.outputs[0].token_ids for o in by_text]
    assert single[0].outputs[0].token_ids == by_text[0].outputs[0].token_ids


def test_generate_keyword_names(llm):
    by_keyword = llm.generate(prompts=PROMPTS[:2], sampling_params=GREEDY, use_tqdm=False)
    by_old_name = llm.generate(PROMPTS[:2], params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].text for o in by_keyword] == [o.outputs[0].text for o in by_old_name]
    with pytest.raises(TypeError, match="not both"):
        llm.generate(PROMPTS[:2], GREEDY, params=GREEDY)


# ---- chat (defect 6) ------------------------------------------------------------------------------------------

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}" \
           "<assistant>{% endif %}"


def test_chat_without_a_template_says_so(llm):
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat([{"role": "user", "content": "hi"}])
    assert_idle(llm)


def test_chat_renders_the_template_and_generates(llm):
    conversation = [{"role": "user", "content": "Water boils at"}]
    out = llm.chat(conversation, GREEDY, chat_template=TEMPLATE, use_tqdm=False)
    rendered = "<user>Water boils at\n<assistant>"
    assert out[0].prompt == rendered
    assert out[0].prompt_token_ids == llm.get_tokenizer().encode(rendered, add_special_tokens=False)
    assert out[0].outputs[0].text == text_of(llm, {"prompt_token_ids": out[0].prompt_token_ids})
    two = llm.chat([conversation, [{"role": "user", "content": "A B C"}]], GREEDY, chat_template=TEMPLATE,
                   use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].text == out[0].outputs[0].text
    with pytest.raises(TypeError, match="conversation"):
        llm.chat([{"content": "no role"}], chat_template=TEMPLATE)


# ---- vLLM's constructor names ---------------------------------------------------------------------------------

def test_vllm_constructor_names(checkpoints, tmp_path, caplog):
    from tests.conftest import make_tokenizer

    other = tmp_path / "tokenizer"
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(other)
    llm = LLM(checkpoints["llama"], kv_cache_blocks=16, tokenizer=str(other), seed=3, enforce_eager=True)
    assert llm.get_tokenizer().chat_template == TEMPLATE  # the tokenizer given, not the model's
    with pytest.raises(ValueError, match="CUDA"):
        LLM(checkpoints["llama"], device="cpu", gpu_memory_utilization=0.8)
    with pytest.raises(ValueError, match="one device"):
        LLM(checkpoints["llama"], kv_cache_blocks=16, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="not both"):
        LLM(checkpoints["llama"], memory_budget="1GiB", gpu_memory_utilization=0.5)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(checkpoints["llama"], gpu_memory_utilization=1.5)
    with caplog.at_level("WARNING", logger="helios"):
        LLM(checkpoints["llama"], kv_cache_blocks=16, trust_remote_code=True)
    assert "never runs code" in caplog.text


# ---- KV pool sizing (defect 7) --------------------------------------------------------------------------------

def test_cpu_kv_pool_does_not_follow_the_page_cache(checkpoints, monkeypatch):
    import helios.kv.sizing as sizing

    sizes = []
    for available in (20 * 2**30, 17 * 2**30):  # free memory moves with the page cache; MemAvailable barely does
        monkeypatch.setattr(sizing, "available_host_memory", lambda a=available: a)
        stats = LLM(checkpoints["llama"], dtype="float32").stats()
        sizes.append(stats["kv_blocks_total"])
        assert stats["kv_cache_bytes"] <= 4 * 2**30 and "CPU default: 4.00 GiB" in stats["kv_cache_sizing"]
    assert sizes[0] == sizes[1]
    monkeypatch.setattr(sizing, "available_host_memory", lambda: 2 * 2**30)  # a small machine: a quarter of it
    small = LLM(checkpoints["llama"], dtype="float32").stats()
    assert small["kv_cache_bytes"] <= 2**29 and "quarter" in small["kv_cache_sizing"]
    assert "kv_cache_blocks=16 (set)" == LLM(checkpoints["llama"], kv_cache_blocks=16).stats()["kv_cache_sizing"]


def test_available_memory_counts_reclaimable_page_cache(tmp_path, monkeypatch):
    from helios.utils import memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:          900000 kB\nMemAvailable:   20000000 kB\n")
    real = memory._meminfo_bytes
    monkeypatch.setattr(memory, "_meminfo_bytes", lambda field: real(field, str(meminfo)))
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    assert memory.available_host_memory() == 20000000 * 1024
