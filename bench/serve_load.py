"""The HTTP server under load vs the offline API: `helios serve` in its own process, N concurrent streaming clients
(httpx, loopback) each sending greedy completions of gsm8k questions one after another, compared with
`LLM.generate` on the same prompts at the same batch width (max_num_seqs = N) in this process.

Per model and client count: requests/s, generated tokens/s, TTFT and TPOT p50/p99 (as the clients see them), the
offline tokens/s and the server's overhead (1 - server / offline tokens/s), and whether the served texts equal the
offline ones. Every run gets fresh prompts (no prefix-cache hits from earlier runs). Server and offline runs
alternate (--rounds); the fastest run of each is reported (min-of-N:
the machine's noise only ever slows a run down). Clients share the CPU with the
server (a client on another machine would not).
Usage: python bench/serve_load.py [--models smollm2-135m gemma3-270m] [--clients 1 8 32 64] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# helios before torch (which `common` imports): this process then runs with the OpenMP wait policy the server
# process gets from helios, so the offline side is timed under the same threading as the served one
from helios import LLM, SamplingParams
from helios.model.source import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, gsm8k_questions, machine, save  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model: str, max_num_seqs: int, extra: list[str]):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "helios.cli", "serve", "--model", model, "--port", str(port),
                                "--max-num-seqs", str(max_num_seqs), "--log-level", "warning", *extra])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"helios serve --model {model} did not start")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(60)


async def stream_one(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    started = time.monotonic()
    first = last = None
    pieces = []
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.monotonic()
                first = first or last
                pieces.append(chunk["choices"][0]["text"])
    return {"text": "".join(pieces), "tokens": tokens, "ttft": first - started,
            "tpot": (last - first) / max(1, tokens - 1)}


async def load(url: str, prompts: list[str], clients: int, max_tokens: int) -> tuple[float, list[dict]]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        todo = iter(range(len(prompts)))
        results: dict[int, dict] = {}

        async def client() -> None:
            for i in todo:
                results[i] = await stream_one(http, prompts[i], max_tokens)

        started = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        return time.perf_counter() - started, [results[i] for i in range(len(prompts))]


def offline(model: str, prompts: list[str], clients: int, max_tokens: int, engine_kwargs: dict
            ) -> tuple[float, list[str]]:
    llm = LLM(model, max_num_seqs=clients, **engine_kwargs)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up, as the server gets one
    llm.reset_prefix_cache()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - started, [o.outputs[0].text for o in outputs]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="server/offline alternations per client count")
    parser.add_argument("--memory-budget", default=None)
    args = parser.parse_args()

    sizes = [max(args.min_requests, c * args.requests_per_client) for c in args.clients]
    questions = gsm8k_questions(1 + args.rounds * sum(sizes))
    prompts_all = [f"Question: {q}\nAnswer:" for q in questions]
    engine_kwargs = {"memory_budget": args.memory_budget} if args.memory_budget else {}
    extra = ["--memory-budget", args.memory_budget] if args.memory_budget else []
    rows = []
    for model in args.models:
        try:  # a model whose package is not installed is skipped
            resolve_model(model)
        except (FileNotFoundError, ValueError) as e:
            print(f"skipping {model}: {e}")
            continue
        with server(model, max(args.clients), extra) as url:
            asyncio.run(load(url, prompts_all[-1:], 1, 2))  # warm-up
            fresh = iter(prompts_all[:-1])  # every run gets prompts nobody has seen: no prefix-cache hits across runs
            for clients, n in zip(args.clients, sizes, strict=True):
                served, local = [], []
                for _ in range(args.rounds):
                    prompts = [next(fresh) for _ in range(n)]
                    seconds, results = asyncio.run(load(url, prompts, clients, args.max_tokens))
                    seconds_offline, texts = offline(model, prompts, clients, args.max_tokens, engine_kwargs)
                    served.append((seconds, results, texts))
                    local.append(seconds_offline)
                seconds, results, local_texts = min(served, key=lambda run: run[0])
                tokens = sum(r["tokens"] for r in results)
                offline_seconds = min(local)
                row = {
                    "model": model, "clients": clients, "requests": n, "max_tokens": args.max_tokens,
                    "requests_per_s": round(n / seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
                    "offline_tokens_per_s": round(tokens / offline_seconds, 2),
                    "server_overhead": round(1 - offline_seconds / seconds, 4),
                    "ttft_p50_ms": round(1e3 * pct([r["ttft"] for r in results], 0.5), 1),
                    "ttft_p99_ms": round(1e3 * pct([r["ttft"] for r in results], 0.99), 1),
                    "tpot_p50_ms": round(1e3 * pct([r["tpot"] for r in results], 0.5), 2),
                    "tpot_p99_ms": round(1e3 * pct([r["tpot"] for r in results], 0.99), 2),
                    "texts_equal_offline": round(sum(r["text"] == t for r, t in zip(results, local_texts, strict=True))
                                                 / n, 4),
                    "server_seconds": [round(run[0], 2) for run in served],
                    "offline_seconds": [round(s, 2) for s in local],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)

    header = ["model", "clients", "requests", "req/s", "tok/s", "offline tok/s", "overhead", "TTFT p50/p99 ms",
              "TPOT p50/p99 ms", "texts = offline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['tokens_per_s']} "
                     f"| {r['offline_tokens_per_s']} | {100 * r['server_overhead']:.1f}% | {r['ttft_p50_ms']} / "
                     f"{r['ttft_p99_ms']} | {r['tpot_p50_ms']} / {r['tpot_p99_ms']} | {r['texts_equal_offline']} |")
    table = "\n".join(lines)
    print(table)
    path = save("serve_load", {"benchmark": "serve_load", "args": vars(args), "machine": machine(), "rows": rows,
                               "table": table})
    path.with_suffix(".md").write_text(table + "\n")
    print(f"saved {path} and {path.with_suffix('.md').relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
