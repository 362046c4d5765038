"""CPU thread policy under a competing load: helios and transformers greedy decoding on smollm2-135m, each run in a
fresh process (OpenMP reads its settings once, at start), with and without busy-loop processes on every core.

Settings compared: helios' default (it sets OMP_WAIT_POLICY=PASSIVE when imported before torch: waiting threads
sleep), OpenMP's own default (they spin for a while, then sleep), OMP_WAIT_POLICY=ACTIVE (they spin) and
OMP_NUM_THREADS=1 (one thread, passive). transformers runs in the same kind of process, with the same environment.
Usage: python bench/threads.py [--max-tokens 48] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save  # noqa: E402

WORKLOAD = r"""
import sys, time, json
engine, batch, max_tokens, torch_first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
if torch_first:
    import torch  # loaded before helios: OpenMP keeps its own default wait policy
import helios, torch
from helios import LLM, SamplingParams
llm = LLM("smollm2-135m", max_model_len=512, max_num_seqs=batch)
prompts = ["The history of the Roman Empire"] * batch
if engine == "helios":
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
else:
    from transformers import AutoModelForCausalLM
    tok = llm.get_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(llm.stats()["model_path"], dtype=torch.float32).eval()
    ids = tok(prompts, return_tensors="pt")
    model.generation_config.pad_token_id = tok.eos_token_id
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=2, do_sample=False)
        start = time.perf_counter()
        model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
print(json.dumps({"seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}))
"""

SETTINGS = {  # each in a fresh process that imports helios first
    "helios default (passive wait)": {},
    "OpenMP's own default": {"import torch first": "1"},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
}


def run(engine: str, batch: int, max_tokens: int, env: dict) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    full.update({k: v for k, v in env.items() if k.isupper()})
    torch_first = env.get("import torch first", "0")
    out = subprocess.run([sys.executable, "-c", WORKLOAD, engine, str(batch), str(max_tokens), torch_first],
                         env=full, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def busy_load(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--engines", nargs="+", default=["helios", "transformers"])
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    for load in (0, cores):
        procs = busy_load(load)
        try:
            for engine in args.engines:
                for batch in args.batch_sizes:
                    for name, env in SETTINGS.items():
                        times = [run(engine, batch, args.max_tokens, env)["seconds"] for _ in range(args.rounds)]
                        rows.append({"competing_processes": load, "engine": engine, "batch": batch, "setting": name,
                                     "seconds_min": round(min(times), 2), "seconds": [round(t, 2) for t in times]})
                        print(f"load {load} | {engine:<12} | batch {batch:>2} | {name:<29} | "
                              f"{min(times):6.2f} s", flush=True)
        finally:
            for p in procs:
                p.kill()
    print("\n| competing busy processes | engine | batch | " + " | ".join(SETTINGS) + " |")
    print("|---:|---|---:|" + "---:|" * len(SETTINGS))
    for load in (0, cores):
        for engine in args.engines:
            for batch in args.batch_sizes:
                cells = [next(r["seconds_min"] for r in rows if r["competing_processes"] == load and
                              r["engine"] == engine and r["batch"] == batch and r["setting"] == name)
                         for name in SETTINGS]
                print(f"| {load} | {engine} | {batch} | " + " | ".join(f"{c:.2f} s" for c in cells) + " |")
    path = save("threads", {"benchmark": "threads", "max_tokens": args.max_tokens, "machine": machine(),
                            "time": time.strftime("%Y-%m-%d %H:%M"), "rows": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
