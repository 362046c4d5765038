"""HELIOS vs its baselines on this machine, one run, one memory budget, one shifting workload (the paper's comparison).

Workload: phases of real prompts from ../shared/data (gsm8k questions, xsum articles to summarize, tinyshakespeare
passages to continue), arriving in waves of --wave concurrent requests; greedy, --max-tokens new tokens, EOS
ignored (every configuration generates the same number of tokens). Configurations:
  plain:<model>   full depth, no exits (each candidate)
  ee:<model>      single-model early exit, every layer loaded, offline-calibrated thresholds (EE-LLM style)
  helios:<slo>    the control plane over all candidates (throughput, latency; :COVERAGE sets its depth rule)
Reported per configuration: throughput, TTFT and TPOT mean / p99, max concurrent sequences at the budget, quality
(token agreement with plain decoding of the same model up to the first divergence, bits per byte of the output
under the best full model), the exit histogram, and for HELIOS the events and the live exit precision.
Writes bench/results/helios_vs_baselines-cpu-<time>.json and a .png (throughput and agreement per wave with the
control plane's events; exit histograms).

Exit heads: each candidate's tuned heads are found in its model directory's helios_exits/ folder (install them with
--heads MODEL=DIR: copied there), calibrated offline (the EE baseline's thresholds).

Usage: python bench/helios_vs_baselines.py [--models smollm2-135m gemma3-270m] [--heads smollm2-135m=DIR ...]
       [--phase-requests 96] [--wave 16] [--max-tokens 32] [--memory-budget 3GiB]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import helios  # noqa: E402, F401  (before torch: thread policy)
from helios import LLM, ExitConfig, SamplingParams  # noqa: E402
from helios.control import SLO  # noqa: E402
from helios.engine.engine import LLMEngine  # noqa: E402
from helios.exits.heads import MANIFEST_FILE, MODEL_SUBFOLDER  # noqa: E402
from helios.exits.thresholds import exit_report  # noqa: E402
from helios.model.source import resolve_model  # noqa: E402

SHARED = Path(os.environ.get("HELIOS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATA = SHARED / "data"
RESULTS = Path(__file__).resolve().parent / "results"


# ---- workload ---------------------------------------------------------------------------------------------------
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def workload(per_phase: int) -> list[tuple[str, str]]:
    """(phase, prompt) in arrival order, from text that exit calibration never read: the last gsm8k test questions
    (calibration reads the first 800), windows of the last five xsum-sample articles (calibration reads the first
    five; the sample has only ten, so the windows overlap), passages of tinyshakespeare's second half (exit tuning
    trained on windows from the whole file)."""
    gsm = [f"Question: {r['question']}\nAnswer:" for r in _jsonl(DATA / "gsm8k" / "test.jsonl")[-per_phase:]]
    news = " ".join(r["document"] for r in _jsonl(DATA / "xsum-sample" / "sample.jsonl")[5:])
    stride = max(1, (len(news) - 300) // per_phase)
    xsum = [f"Article: {news[i * stride:i * stride + 300]}\nSummary:" for i in range(per_phase)]
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()
    tail = text[len(text) // 2:]
    passages = [tail[i * 400:i * 400 + 300] for i in range(per_phase)]
    return [("gsm8k", p) for p in gsm] + [("xsum", p) for p in xsum] + [("shakespeare", p) for p in passages]


# ---- running one configuration ------------------------------------------------------------------------------------
def run(name: str, llm: LLM, prompts: list[tuple[str, str]], wave: int, max_tokens: int,
        model_name: str | None = None) -> dict:
    """model_name: the model a single-model LLM serves (HELIOS records which model served each request)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    records, waves = [], []
    started = time.perf_counter()
    for w in range(0, len(prompts), wave):
        batch = prompts[w:w + wave]
        requests = [engine.make_request(p, params) for _, p in batch]
        arrival = time.perf_counter()
        for r in requests:
            engine.add_request(r)
        first: dict[int, float] = {}
        while engine.has_unfinished() or not all(r.is_finished for r in requests):
            engine.step()
            now = time.perf_counter()
            for i, r in enumerate(requests):
                if i not in first and engine.output(r).outputs[0].token_ids:
                    first[i] = now
        done = time.perf_counter()
        for i, ((phase, prompt), r) in enumerate(zip(batch, requests, strict=True)):
            out = engine.output(r).outputs[0]
            models = list(r.seqs[0].models) if hasattr(r.seqs[0], "models") else [model_name]
            n = len(out.token_ids)
            records.append({"phase": phase, "prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                            "models": models, "exit_layers": out.exit_layers, "ttft": first.get(i, done) - arrival,
                            "tpot": (done - first.get(i, done)) / max(1, n - 1)})
        waves.append({"start": arrival - started, "end": done - started, "tokens": sum(
            len(rec["token_ids"]) for rec in records[-len(batch):]), "phase": batch[0][0]})
    seconds = time.perf_counter() - started
    stats = llm.stats()
    tokens = sum(len(r["token_ids"]) for r in records)
    return {"name": name, "seconds": round(seconds, 2), "tokens": tokens,
            "tokens_per_second": round(tokens / seconds, 2),
            "ttft_mean": statistics.mean(r["ttft"] for r in records), "ttft_p99": _p99([r["ttft"] for r in records]),
            "tpot_mean": statistics.mean(r["tpot"] for r in records), "tpot_p99": _p99([r["tpot"] for r in records]),
            "max_concurrent_seqs": stats.get("max_concurrent_seqs"), "loaded_layers": stats.get("loaded_layers"),
            "weight_bytes": stats.get("weight_bytes"), "kv_blocks_total": stats.get("kv_blocks_total"),
            "records": records, "waves": waves, "events": stats.get("events", []), "control": stats.get("control"),
            "exit_histogram": _histogram(records), "live_exit_precision": _live_precision(engine)}


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _histogram(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        for layer in r["exit_layers"]:
            counts[str(layer)] = counts.get(str(layer), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


# ---- quality ------------------------------------------------------------------------------------------------------
def agreement(got: list[int], want: list[int]) -> float:
    same = 0
    for a, b in zip(got, want, strict=False):
        if a != b:
            break
        same += 1
    return same / max(1, len(want))


def score_quality(result: dict, plain: dict[str, dict]) -> None:
    """Agreement with the plain run of the model that served each request (requests that two models served are
    counted apart, as 'mixed')."""
    values, mixed = [], 0
    for i, r in enumerate(result["records"]):
        if len(set(r["models"])) != 1 or r["models"][0] not in plain:
            mixed += 1
            r["agreement"] = None
            continue
        r["agreement"] = agreement(r["token_ids"], plain[r["models"][0]]["records"][i]["token_ids"])
        values.append(r["agreement"])
    result["agreement"] = round(statistics.mean(values), 4) if values else None
    result["mixed_requests"] = mixed


@torch.inference_mode()
def bits_per_byte(judge: LLMEngine, records: list[dict]) -> float:
    """Bits per byte of the outputs under the judge model, each given its prompt."""
    nats, num_bytes = 0.0, 0
    for r in records:
        prompt_ids = judge.tokenizer.encode(r["prompt"])
        ids = judge.tokenizer.encode(r["prompt"] + r["text"])
        if len(ids) <= len(prompt_ids) or len(ids) >= judge.max_model_len:
            continue
        logits = judge.prompt_logits(ids)
        log_probs = logits[len(prompt_ids) - 1:-1].log_softmax(-1)
        targets = torch.tensor(ids[len(prompt_ids):])
        nats -= float(log_probs.gather(1, targets[:, None]).sum())
        num_bytes += len(r["text"].encode())
    return nats / 0.6931471805599453 / max(1, num_bytes)


# ---- set-up -------------------------------------------------------------------------------------------------------
def install_heads(model: str, heads: Path) -> Path:
    """Copies tuned heads into the model's helios_exits/ folder (where every engine of it finds them)."""
    target = Path(resolve_model(model).path) / MODEL_SUBFOLDER
    if not (heads / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{heads} holds no exit heads ({MANIFEST_FILE} missing)")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(heads, target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--heads", nargs="*", default=[], help="MODEL=DIR: tuned, calibrated heads to install")
    parser.add_argument("--phase-requests", type=int, default=96)
    parser.add_argument("--wave", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--memory-budget", default="3GiB")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--helios", nargs="+", default=["throughput", "latency"],
                        help="HELIOS runs: OBJECTIVE or OBJECTIVE:COVERAGE (the depth rule's token share, default 0.9)")
    parser.add_argument("--ee", nargs="*", default=None,
                        help="EE runs as MODEL@LABEL=HEADS_DIR (heads calibrated offline at some target); default: "
                             "each model with its installed heads")
    args = parser.parse_args()
    for item in args.heads:
        model, _, directory = item.partition("=")
        print(f"heads for {model}: {install_heads(model, Path(directory))}", file=sys.stderr)
    prompts = workload(args.phase_requests)
    common = dict(memory_budget=args.memory_budget, max_model_len=args.max_model_len, dtype="float32")
    results, plain = {}, {}
    for model in args.models:
        name = f"plain:{model}"
        print(f"running {name}", file=sys.stderr)
        results[name] = plain[model] = run(name, LLM(model, **common), prompts, args.wave, args.max_tokens, model)
    ee_runs = [(f"{m}", m, None) for m in args.models] if args.ee is None else [
        (item.partition("=")[0], item.partition("@")[0], item.partition("=")[2]) for item in args.ee]
    for label, model, heads in ee_runs:
        name = f"ee:{label}"
        print(f"running {name}", file=sys.stderr)
        results[name] = run(name, LLM(model, early_exit=ExitConfig(heads=heads), **common), prompts, args.wave,
                            args.max_tokens, model)
    for spec in args.helios:
        objective, _, coverage = spec.partition(":")
        slo = SLO(objective=objective, coverage=float(coverage) if coverage else 0.9)
        name = f"helios:{spec}"
        print(f"running {name}", file=sys.stderr)
        results[name] = run(name, LLM(args.models, slo=slo, **common), prompts, args.wave, args.max_tokens)
    for result in results.values():
        score_quality(result, plain)
    # the judge: the candidate with the lowest prompt bits per byte in HELIOS' own profile
    pht = next(r["control"]["pht"] for r in results.values() if r.get("control"))
    judge_name = min(pht, key=lambda row: row["prompt_bpb"] or 1e9)["model"]
    judge = LLM(judge_name, dtype="float32", max_model_len=args.max_model_len, enable_prefix_caching=False).engine
    for result in results.values():
        result["output_bpb"] = round(bits_per_byte(judge, result["records"]), 4)
    summary = _summary(results, judge_name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"helios_vs_baselines-cpu-{stamp}.json"
    payload = {"benchmark": "helios_vs_baselines", "args": vars(args), "judge": judge_name, "summary": summary,
               "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
               "results": {k: {**v, "records": [{k2: v2 for k2, v2 in r.items() if k2 not in ("prompt", "text")}
                                                for r in v["records"]]} for k, v in results.items()}}
    out.write_text(json.dumps(payload, indent=1, default=str))
    _plot(results, out.with_suffix(".png"))
    _print(summary)
    print(f"saved {out} and {out.with_suffix('.png')}")
    return 0


def _live_precision(engine) -> dict | None:
    """HELIOS: how the active plan's exits and breach threshold do on the latest live profile of its model (the
    pairs it was calibrated on), and the breach rate seen while serving."""
    active = getattr(engine, "active", None)
    if active is None:
        return None
    profile = engine.repository.candidates[active.model].latest
    stats = profile.exit_stats()
    layers = [x for x in active.plan.exits if x in stats.values]
    report = exit_report(type(stats)(stats.confidence, {x: stats.values[x] for x in layers},
                                     {x: stats.agree[x] for x in layers}),
                         {x: active.plan.thresholds[x] for x in layers}) if layers else None
    depth = active.plan.depth
    at_depth = None
    if depth in stats.values:
        agree = stats.agree[depth]
        at_depth = {"agreement_with_last_layer": round(float(agree.float().mean()), 4),
                    "threshold": active.plan.thresholds[depth]}
    return {"model": active.model, "depth": depth, "intermediate_exits": report, "at_depth": at_depth,
            "breaches": engine.monitor.total_breaches, "tokens_monitored": engine.monitor.total_tokens}


def _summary(results: dict, judge: str) -> list[dict]:
    rows = []
    for name, r in results.items():
        rows.append({"config": name, "tok_s": r["tokens_per_second"], "ttft_mean_s": round(r["ttft_mean"], 3),
                     "ttft_p99_s": round(r["ttft_p99"], 3), "tpot_mean_ms": round(1e3 * r["tpot_mean"], 1),
                     "tpot_p99_ms": round(1e3 * r["tpot_p99"], 1), "max_concurrent_seqs": r["max_concurrent_seqs"],
                     "loaded_layers": r["loaded_layers"], "agreement": r["agreement"],
                     "mixed_requests": r["mixed_requests"], f"output_bpb[{judge}]": r["output_bpb"],
                     "exit_histogram": r["exit_histogram"]})
    return rows


def _print(summary: list[dict]) -> None:
    for row in summary:
        print(json.dumps({k: v for k, v in row.items() if k != "exit_histogram"}))


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 11))
    for name, r in results.items():
        xs = [w["end"] for w in r["waves"]]
        axes[0].plot(xs, [w["tokens"] / max(1e-9, w["end"] - w["start"]) for w in r["waves"]], label=name)
        per_wave, size = [], len(r["records"]) // max(1, len(r["waves"]))
        for k in range(len(r["waves"])):
            chunk = [x["agreement"] for x in r["records"][k * size:(k + 1) * size] if x.get("agreement") is not None]
            per_wave.append(statistics.mean(chunk) if chunk else float("nan"))
        axes[1].plot(xs, per_wave, label=name)
        if r.get("events"):
            t0 = r["events"][0]["time"]
            for event in r["events"]:
                if event["kind"] in ("select", "grow", "switch", "truncate"):
                    axes[0].axvline(event["time"] - t0, color="gray", alpha=0.3)
                    axes[0].text(event["time"] - t0, 0, event["kind"], rotation=90, fontsize=6)
    axes[0].set_ylabel("tokens/s per wave")
    axes[1].set_ylabel("agreement with plain")
    axes[1].set_xlabel("seconds since the configuration started")
    axes[0].legend(fontsize=7)
    for name, r in results.items():
        hist = r["exit_histogram"]
        axes[2].bar([f"{name}\n{k}" for k in hist], list(hist.values()))
    axes[2].tick_params(axis="x", labelsize=5, rotation=90)
    axes[2].set_ylabel("tokens by exit layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
