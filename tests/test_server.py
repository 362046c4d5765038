"""The OpenAI-compatible server, driven over loopback by the official openai client and by raw HTTP: completions,
chat, streaming, models, metrics, every error case, an engine fault on one request, a 64-client load test whose
texts equal the offline API's, disconnects that leak nothing, a model switch during streaming, and a clean exit
on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest
from conftest import stories260k_path

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402

from helios import LLM, AsyncLLM, SamplingParams  # noqa: E402
from helios.server import build_app  # noqa: E402

STORIES = stories260k_path()
needs_stories = pytest.mark.skipif(STORIES is None, reason="stories260k not found (../shared/models/stories260k)")
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "One day, a bird",
           "Tom had a big red ball", "The sun was hot and", "Mom said", "There was a cat named"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """The app served by uvicorn on a free loopback port, in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def offline_texts(prompts: list, params: SamplingParams, **kwargs) -> list[str]:
    return [o.outputs[0].text for o in LLM(STORIES, **kwargs).generate(prompts, params, use_tqdm=False)]


def wait_idle(llm: AsyncLLM, timeout: float = 30.0) -> dict:
    """The engine's stats once no request is left (the engine thread may still be finishing a step)."""
    deadline = time.monotonic() + timeout
    while True:
        with llm.engine.lock:
            stats = llm.engine.stats()
            if not llm.engine.has_unfinished() and not llm.engine.requests:
                return stats
        assert time.monotonic() < deadline, f"requests still unfinished: {list(llm.engine.requests)}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stories_server():
    if STORIES is None:
        pytest.skip("stories260k not found (../shared/models/stories260k)")
    llm = AsyncLLM(STORIES, kv_cache_blocks=512, max_num_seqs=64)
    llm.get_tokenizer().chat_template = CHAT_TEMPLATE
    with running(build_app(llm, ["stories"])) as url:
        yield url, llm


@pytest.fixture
def client(stories_server):
    return openai.OpenAI(base_url=stories_server[0] + "/v1", api_key="unused", max_retries=0)


# ---- the openai client ------------------------------------------------------------------------------------------
def test_completions_whole_and_streamed_equal_the_offline_api(stories_server, client):
    offline = LLM(STORIES).generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    want = [o.outputs[0].text for o in offline]
    whole = client.completions.create(model="stories", prompt=PROMPTS[:3], max_tokens=24, temperature=0)
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == want
    tokenizer = stories_server[1].get_tokenizer()
    assert whole.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in PROMPTS[:3])
    assert whole.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in offline)
    assert whole.object == "text_completion" and whole.model == "stories"
    chunks = list(client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices


def test_a_streamed_batch_of_prompts_keeps_each_choice_apart(stories_server):
    url, _ = stories_server
    want = offline_texts(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=12))
    body = {"prompt": PROMPTS[:2], "max_tokens": 12, "temperature": 0, "stream": True}
    texts, finish = ["", ""], [None, None]
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    assert finish[choice["index"]] is None  # nothing after a choice's finish
                    texts[choice["index"]] += choice["text"]
                    finish[choice["index"]] = choice["finish_reason"]
    assert texts == want and None not in finish


def test_the_event_loop_answers_while_a_step_runs(stories_server, monkeypatch):
    """The engine steps in its own thread: a slow step does not hold up other HTTP traffic."""
    url, llm = stories_server
    runner = llm.engine.runner
    real_step = runner.step

    def slow_step(batch):
        time.sleep(2.0)
        return real_step(batch)

    monkeypatch.setattr(runner, "step", slow_step)
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "Mom", "max_tokens": 2, "stream": True},
                      timeout=60) as response:
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        answered = time.monotonic() - started
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert answered < 1.5 and lines  # far less than the 2 s step it overlapped


def test_chat_uses_the_chat_template_whole_and_streamed(stories_server, client):
    _, llm = stories_server
    messages = [{"role": "user", "content": "Tell me a story"}]
    prompt = llm.llm.chat_prompt(messages)
    (want,) = offline_texts([prompt], SamplingParams(temperature=0, max_tokens=16))
    reply = client.chat.completions.create(model="stories", messages=messages, max_completion_tokens=16,
                                           temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == want
    assert reply.usage.prompt_tokens == len(prompt["prompt_token_ids"])
    stream = client.chat.completions.create(model="stories", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_models_health_sampling_fields_and_telemetry(stories_server, client):
    url, _ = stories_server
    models = client.models.list().data
    assert [m.id for m in models] == ["stories"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    seeded = [client.completions.create(model="stories", prompt=PROMPTS[1], max_tokens=12, temperature=1.0,
                                        top_p=0.9, seed=5, n=2).choices for _ in range(2)]
    assert [c.text for c in seeded[0]] == [c.text for c in seeded[1]]  # a seed makes sampling repeatable
    assert sorted(c.index for c in seeded[0]) == [0, 1]
    stopped = client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                        stop=[" girl"])
    assert " girl" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    told = client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                     extra_body={"exit_telemetry": True})
    telemetry = told.choices[0].model_extra["helios"]
    assert len(telemetry["exit_layers"]) == len(telemetry["confidences"]) == told.usage.completion_tokens
    assert telemetry["depth"] == 5 and telemetry["model"] == str(STORIES)
    plain = client.completions.create(model="stories", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert "helios" not in (plain.choices[0].model_extra or {})


def test_metrics_list_requests_tokens_latency_and_engine_state(stories_server, client):
    url, _ = stories_server
    client.completions.create(model="stories", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    text = httpx.get(url + "/metrics").text
    for name in ("helios_requests_total", "helios_prompt_tokens_total", "helios_generation_tokens_total",
                 "helios_time_to_first_token_seconds_bucket", "helios_time_per_output_token_seconds_bucket",
                 "helios_e2e_request_latency_seconds_bucket", "helios_num_requests_running",
                 "helios_num_requests_waiting", "helios_kv_blocks_used", "helios_kv_cache_usage_ratio",
                 "helios_num_preemptions_total", "helios_exit_layer_tokens_total", "helios_breaches_total",
                 "helios_active_model", "helios_active_depth 5.0"):
        assert name in text, name
    length = float(text.split('helios_requests_total{status="length"} ')[1].split()[0])
    assert length >= 1
    assert "helios_energy" not in text  # no GPU here: no energy metrics, and no error


class FakeNvml:
    """NVML's energy counter (millijoules since the driver loaded), advancing 1.5 J per read."""

    def __init__(self):
        self.mj = 10_000

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self.mj += 1500
        return self.mj


def test_energy_metrics_appear_with_a_gpu_meter_and_never_fail_without(stories_server):
    from helios.async_llm import RequestTimes
    from helios.server.energy import EnergyMeter, energy_meter
    from helios.server.metrics import ServerMetrics

    _, llm = stories_server
    assert energy_meter("cpu") is None
    metrics = ServerMetrics(llm, EnergyMeter(FakeNvml(), handle=0))  # reads the baseline
    out = asyncio.run(_one_output(llm))
    metrics.finished(out, RequestTimes(arrival=0.0, first_token=0.1, finished=0.4))
    text = metrics.render().decode()  # one more read: 1.5 J since the baseline
    assert float(text.split("\nhelios_energy_joules_total ")[1].split()[0]) == 1.5
    per_token = float(text.split("\nhelios_energy_joules_per_token ")[1].split()[0])
    assert per_token == pytest.approx(1.5 / 4)


async def _one_output(llm: AsyncLLM):
    outputs = [out async for out in llm.generate("Mom said", SamplingParams(max_tokens=4, ignore_eos=True))]
    return outputs[-1]


# ---- errors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (json.dumps({"prompt": "x", "model": "gpt-4"}), "model"),
    (json.dumps({"prompt": "x", "temperature": -1}), "temperature"),
    (json.dumps({"prompt": "x", "n": 0}), "n"),
    (json.dumps({"prompt": "x", "max_tokens": "many"}), "max_tokens"),
    (json.dumps({"prompt": "x", "top_k": -5}), "top_k"),
    (json.dumps({"prompt": "x", "logprobs": 2}), "logprobs"),
    (json.dumps({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), "stop"),
    (json.dumps({"max_tokens": 3}), "prompt"),
    (json.dumps({"prompt": "Once " * 600}), "prompt"),
    (json.dumps({"prompt": [10**9]}), "prompt"),
])
def test_bad_completion_requests_get_openai_style_400(stories_server, body, param):
    url, llm = stories_server
    response = httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    assert not llm.engine.requests  # nothing was queued


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "Once " * 600}]}, "messages"),
])
def test_bad_chat_requests_get_openai_style_400(stories_server, body, param):
    url, _ = stories_server
    response = httpx.post(url + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_error_for_a_long_prompt_says_context_length_exceeded(stories_server):
    url, _ = stories_server
    error = httpx.post(url + "/v1/completions", json={"prompt": "Once " * 600}).json()["error"]
    assert error["code"] == "context_length_exceeded" and "max_model_len" in error["message"]


def test_an_engine_fault_fails_only_its_request_with_500(stories_server, monkeypatch):
    url, llm = stories_server
    poison = 77  # any batch holding a sequence whose prompt starts with this token id fails
    runner = llm.engine.runner
    real_step = runner.step

    def faulty_step(batch):
        if any(item.seq.prompt_token_ids[0] == poison for item in batch):
            raise RuntimeError("injected fault")
        return real_step(batch)

    monkeypatch.setattr(runner, "step", faulty_step)
    (want,) = offline_texts([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))

    async def both():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            good = http.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 20, "temperature": 0,
                                                      "ignore_eos": True})
            bad = http.post("/v1/completions", json={"prompt": [poison, 5, 6], "max_tokens": 20})
            return await asyncio.gather(good, bad)

    good, bad = asyncio.run(both())
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
    assert "injected fault" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == want
    streamed = httpx.post(url + "/v1/completions", json={"prompt": [poison, 5], "stream": True}).text
    assert '"server_error"' in streamed and streamed.rstrip().endswith("data: [DONE]")
    stats = wait_idle(llm)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert httpx.post(url + "/v1/completions", json={"prompt": "Mom", "max_tokens": 3}).status_code == 200


# ---- load -------------------------------------------------------------------------------------------------------
async def _stream_one(http, prompt: str, max_tokens: int) -> tuple[str, float, float, int]:
    """(text, TTFT, mean time per output token, chunks) of one streamed greedy completion."""
    started = time.monotonic()
    first = last = None
    pieces = []
    async with http.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                            "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk["choices"][0]["text"]:
                last = time.monotonic()
                first = first or last
            pieces.append(chunk["choices"][0]["text"])
    tpot = (last - first) / max(1, len(pieces) - 1) if first else 0.0
    return "".join(pieces), (first or time.monotonic()) - started, tpot, len(pieces)


@needs_stories
def test_64_streaming_clients_get_the_offline_text_and_leave_no_blocks(stories_server):
    url, llm = stories_server
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(320)]
    want = offline_texts(prompts, SamplingParams(temperature=0, max_tokens=24))

    async def load():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            todo = iter(range(len(prompts)))
            results: dict[int, tuple] = {}

            async def client_loop():
                for i in todo:
                    results[i] = await _stream_one(http, prompts[i], 24)

            await asyncio.gather(*[client_loop() for _ in range(64)])
            return [results[i] for i in range(len(prompts))]

    results = asyncio.run(load())
    texts = [r[0] for r in results]
    assert texts == want
    ttft = sorted(r[1] for r in results)
    tpot = sorted(r[2] for r in results)
    print(f"\n320 requests, 64 clients: TTFT p50 {1e3 * statistics.median(ttft):.1f} ms p99 "
          f"{1e3 * ttft[int(0.99 * len(ttft))]:.1f} ms; TPOT p50 {1e3 * statistics.median(tpot):.2f} ms p99 "
          f"{1e3 * tpot[int(0.99 * len(tpot))]:.2f} ms")
    stats = wait_idle(llm)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


@needs_stories
def test_a_burst_of_disconnecting_clients_leaks_nothing(stories_server):
    url, llm = stories_server

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async def leave_early(i: int, whole: bool):
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 200, "ignore_eos": True,
                        "stream": not whole}
                if whole:  # a non-streaming request whose client gives up
                    with contextlib.suppress(httpx.TimeoutException):
                        await http.post("/v1/completions", json=body, timeout=0.05)
                    return
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            break  # disconnect after the first chunk

            await asyncio.gather(*[leave_early(i, whole=i % 4 == 0) for i in range(48)])

    asyncio.run(burst())
    stats = wait_idle(llm)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["num_generated_tokens"] < 48 * 200  # they stopped early, not after 200 tokens each
    metrics = httpx.get(url + "/metrics").text
    # every stream that got a chunk was aborted (a whole request may time out before it even reached the server)
    assert float(metrics.split('helios_requests_total{status="abort"} ')[1].split()[0]) >= 36


# ---- a switch during streaming ------------------------------------------------------------------------------------
def test_streams_survive_a_model_switch_with_continuous_text(tmp_path):
    from test_control import DOMAIN_A, SMALL_SLO, domain_checkpoint

    from helios.control import SLO

    a, b = domain_checkpoint(tmp_path / "a", DOMAIN_A), domain_checkpoint(tmp_path / "b", ["A B C D E F"])
    llm = AsyncLLM([a, b], slo=SLO(**SMALL_SLO), kv_cache_blocks=64)
    controller = llm.engine
    with running(build_app(llm)) as url:
        http = httpx.Client(base_url=url, timeout=60)
        for prompt in DOMAIN_A * 2:  # profiles a, then b; a is deployed truncated
            assert http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4}).status_code == 200
        assert controller.active.model == str(a)

        async def streams():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                async def one(prompt):
                    chunks = []
                    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                            "stream": True, "exit_telemetry": True, "stream_options": {"include_usage": True}}
                    async with client.stream("POST", "/v1/completions", json=body) as response:
                        async for line in response.aiter_lines():
                            if line.startswith("data: {"):
                                chunks.append(json.loads(line[6:]))
                                if len(chunks) == 2 and prompt == DOMAIN_A[0]:
                                    switched.set()
                    return chunks

                switched = asyncio.Event()
                tasks = [asyncio.create_task(one(p)) for p in DOMAIN_A]
                await switched.wait()
                target = next(p for p in controller._plans() if p.model == str(b))
                with controller.lock:  # between two steps, as a breach reaction would
                    controller._deploy(target)
                return await asyncio.gather(*tasks)

        results = asyncio.run(streams())
        switch = [e for e in controller.events.events if e.kind == "switch"]
        assert switch and switch[-1].data["moved"] >= 1
        for chunks in results:
            body = [c for c in chunks if c["choices"]]
            assert body[-1]["choices"][0]["finish_reason"] == "length"
            assert chunks[-1]["usage"]["completion_tokens"] == 24
            layers = [x for c in body for x in c["choices"][0]["helios"]["exit_layers"]]
            assert len(layers) == 24  # every token is accounted for exactly once across the switch
            models = [c["choices"][0]["helios"]["model"] for c in body]
            assert models[-1] == str(b)
        assert str(a) in [c["choices"][0]["helios"]["model"] for c in results[0] if c["choices"]]
        engine = controller.active.engine
        assert not controller.requests and engine.kv_cache.allocator.num_free == engine.kv_cache.num_blocks


# ---- shutdown ---------------------------------------------------------------------------------------------------
@needs_stories
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_in_flight_requests_and_exits_0(sig):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "helios.cli", "serve", "--model", str(STORIES), "--port",
                               str(port), "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            time.sleep(0.2)
        pieces = []
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 300,
                                                                 "ignore_eos": True, "stream": True},
                          timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:]))
                    if len(pieces) == 1:
                        server.send_signal(sig)
        finish = [c["choices"][0]["finish_reason"] for c in pieces if c["choices"]]
        assert finish[-1] == "length" and len(pieces) > 1  # the in-flight request ran to its end
        assert server.wait(60) == 0, server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
        server.stderr.close()


def test_the_serve_command_names_the_extra_when_fastapi_is_missing(monkeypatch, capsys):
    import builtins

    from helios import cli

    real_import = builtins.__import__

    def no_server(name, *args, **kwargs):
        if name.startswith("helios.server"):
            raise ImportError("No module named 'fastapi'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_server)
    assert cli.main(["serve", "--model", "x"]) == 2
    assert "helios-serve[server]" in capsys.readouterr().err


def test_async_llm_streams_what_generate_returns_and_breaking_out_aborts():
    if STORIES is None:
        pytest.skip("stories260k not found")
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = offline_texts(PROMPTS[:4], params)

    async def run():
        async with AsyncLLM(STORIES, kv_cache_blocks=128) as llm:
            async def whole(prompt):
                seen = []
                async for out in llm.generate(prompt, params):
                    seen.append(out.outputs[0].text)
                # a running sample's text never shrinks
                assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:], strict=False))
                return seen[-1]

            texts = await asyncio.gather(*[whole(p) for p in PROMPTS[:4]])
            long = SamplingParams(max_tokens=400, ignore_eos=True)
            async with contextlib.aclosing(llm.generate(PROMPTS[0], long)) as outputs:
                async for out in outputs:
                    if out.outputs[0].token_ids:
                        break  # closing the generator aborts the request: its blocks come back
            return texts, wait_idle(llm)

    texts, stats = asyncio.run(run())
    assert texts == want
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_generated_tokens"] < 4 * 30 + 400

