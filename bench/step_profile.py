"""Where a decode step's time goes: helios on SmolLM2-135M at a few batch sizes, against the weight-bytes floor.

For each weight format and batch size: prompts are prefilled, then --steps decode steps are timed (wall clock,
engine.step) and profiled (torch.profiler, CPU ops). Reports ms per step, the floor (bytes of the weights read per
step, i.e. all but the embedding table, over the measured copy bandwidth: a read + write of a 512 MiB buffer), and
the ops by self time; the time no op accounts for is Python (scheduling, sampling, bookkeeping) and the profiler's
own cost. Decode steps that run in the fused decode stack (one helios._C call for all layers) are also timed inside
it, per phase of a layer (thread 0's work and its wait at the barrier after each phase, summed over the layers).
HELIOS_DECODE_STACK=0 profiles the per-layer path instead.
helios' default OpenMP wait policy (PASSIVE) applies unless OMP_WAIT_POLICY is set; the JSON records which.
Usage: python bench/step_profile.py [--quantization none int8 int4 w8a8 w4a8] [--batch-sizes 1 32] [--steps 24]
                                    [--kv-cache-dtype auto float16]  (each weight format with each cache dtype)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

# isort: off
import helios  # noqa: F401  (before torch: helios' OpenMP wait policy applies, as for a user; README "CPU threads")
import torch
from torch.profiler import ProfilerActivity, profile
# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gsm8k_questions, machine, save  # noqa: E402


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second read + written by a large tensor copy (the best of `repeats`)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def prefilled_engine(llm, prompts: list[list[int]]):
    from helios import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for p in prompts:
        engine.add_request(engine.make_request({"prompt_token_ids": p}, params))
    while any(len(seq.token_ids) <= len(prompt) for seq, prompt in zip(_seqs(engine), prompts, strict=True)):
        engine.step()
    return engine


def _seqs(engine):
    return [request.seqs[0] for request in engine.requests.values()]


STACK_PHASES = ["input_norm", "qkv", "attention", "o_proj", "post_norm", "gate_up", "down"]


def stack_phases(engine, steps: int) -> dict | None:
    """ms per step of each phase inside the decode stack (csrc/cpu/decode_stack.cpp), None if it is not used."""
    if not engine.model.__dict__.get("use_stack"):
        return None
    torch.ops.helios.decode_stack_timing(True)
    for _ in range(steps):
        engine.step()
    seconds = torch.ops.helios.decode_stack_timing(False)
    return {name: {"work_ms": 1e3 * seconds[i, 0].item() / steps, "wait_ms": 1e3 * seconds[i, 1].item() / steps}
            for i, name in enumerate(STACK_PHASES)}


def profile_steps(llm, prompts: list[list[int]], steps: int) -> dict:
    start = time.perf_counter()
    engine = prefilled_engine(llm, prompts)
    prefill_s = time.perf_counter() - start
    for _ in range(3):  # warm-up at this batch shape
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    phases = stack_phases(engine, steps)
    for request_id in list(engine.requests):
        engine.abort(request_id)
    ops = [(e.key, e.self_cpu_time_total / steps / 1e3, e.count / steps) for e in prof.key_averages()]
    ops.sort(key=lambda o: -o[1])
    return {"prefill_s": prefill_s, "prompt_tokens": sum(map(len, prompts)),
            "ms_per_step": 1e3 * statistics.median(times), "ms_per_step_min": 1e3 * min(times),
            "ops": [{"op": name, "ms_per_step": ms, "calls_per_step": calls} for name, ms, calls in ops[:12]],
            "op_ms_per_step": sum(ms for _, ms, _ in ops), "stack_phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--kv-cache-dtype", nargs="+", default=["auto"])
    args = parser.parse_args()

    from helios import LLM

    bandwidth = copy_bandwidth()
    policy = os.environ.get("OMP_WAIT_POLICY")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); OMP_WAIT_POLICY={policy}")
    results = {}
    for quantization, kv_cache_dtype in itertools.product(args.quantization, args.kv_cache_dtype):
        q = None if quantization == "none" else quantization
        llm = LLM("smollm2-135m", dtype="float32", quantization=q, max_num_seqs=max(args.batch_sizes),
                  kv_cache_dtype=kv_cache_dtype)
        label = quantization if kv_cache_dtype == "auto" else f"{quantization}, {kv_cache_dtype} KV"
        tokenizer = llm.get_tokenizer()
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
                   for text in gsm8k_questions(max(args.batch_sizes))]
        stats = llm.stats()
        # a decode step reads every weight but the embedding table (it gathers one row per sequence)
        weight_bytes = stats["weight_bytes"] - stats["embedding_bytes"]
        floor_ms = weight_bytes / bandwidth * 1e3  # as bench/device_timings.py: reading at the copy traffic rate
        for b in args.batch_sizes:
            row = profile_steps(llm, prompts[:b], args.steps)
            row |= {"weight_bytes": weight_bytes, "floor_ms": floor_ms,
                    "tokens_per_s": b * 1e3 / row["ms_per_step"]}
            results[f"{quantization}-b{b}" + ("" if kv_cache_dtype == "auto" else f"-kv-{kv_cache_dtype}")] = row
            print(f"\n{label} batch {b}: {row['ms_per_step']:.1f} ms/step (min {row['ms_per_step_min']:.1f}), "
                  f"floor {floor_ms:.1f} ms ({weight_bytes / 2**20:.0f} MiB of weights), "
                  f"ops {row['op_ms_per_step']:.1f} ms, rest {row['ms_per_step'] - row['op_ms_per_step']:.1f} ms; "
                  f"prefill of {row['prompt_tokens']} tokens {row['prefill_s']:.2f} s")
            for op in row["ops"]:
                print(f"  {op['op']:40s} {op['ms_per_step']:7.2f} ms  {op['calls_per_step']:6.1f} calls")
            if row["stack_phases"]:
                print("  inside the decode stack (thread 0, ms per step: work / wait at the barrier after it):")
                for name, t in row["stack_phases"].items():
                    print(f"    {name:12s} {t['work_ms']:7.2f} / {t['wait_ms']:6.2f}")
        del llm
    path = save("step_profile", {"machine": machine(), "copy_bandwidth_bytes_s": bandwidth, "steps": args.steps,
                                 "omp_wait_policy": policy,
                                 "results": results})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
