"""HELIOS vs its baselines on this machine, one run, one memory budget, one shifting workload (the paper's comparison).

Workload: phases of real prompts from ../shared/data (gsm8k questions, xsum articles to summarize, tinyshakespeare
passages to continue), arriving in waves of --wave requests; greedy, --max-tokens new tokens, EOS ignored (every
configuration generates the same number of tokens). Every configuration gets the same --memory-budget (weights +
activations + KV), so a wave larger than its KV pool holds queues. Configurations:
  plain:<model>          full depth, no exits (each candidate)
  ee:<model>@<target>    single-model early exit, every layer loaded, thresholds calibrated offline at <target>
                         precision on held-out documents (EE-LLM style); one run per --ee-targets value: a curve
  helios:<spec>          the control plane over all candidates; spec = OBJECTIVE[:FIELD=VALUE,...] (SLO fields,
                         e.g. throughput:coverage=0.7)
Quality per configuration: agreement with plain decoding of the model that served each request, both per token
(teacher forced: the share of emitted tokens the full model would have emitted after the same text) and up to
the first divergence; bits per byte of the output under the best full model (the judge); for HELIOS the live
exit precision. Matched quality: HELIOS' throughput over each EE curve's at HELIOS' own token agreement (the
best EE run at that agreement or above, interpolated between runs; above the EE runs' agreement, the most
agreeing run's throughput, an upper bound for EE), its concurrent sequences over EE's, and its throughput over
plain decoding's.
Writes bench/results/helios_vs_baselines-cpu-<time>.json and a .png (throughput and agreement per wave with the
control plane's events; throughput vs agreement curves; exit histograms).

Exit heads: each candidate's tuned heads are found in its model directory's helios_exits/ folder (install them with
--heads MODEL=DIR: copied there). The EE baseline's thresholds are calibrated here, offline, on the first 800
gsm8k test records and the first 5 xsum articles (documents, not the served prompts; the workload never uses them).

Usage: python bench/helios_vs_baselines.py [--models smollm2-135m gemma3-270m] [--heads smollm2-135m=DIR ...]
       [--ee-layers smollm2-135m=12,20,24 ...] [--ee-models smollm2-135m] [--ee-targets 0.8 0.9 0.95 0.98]
       [--phase-requests 64] [--wave 64] [--max-tokens 32] [--memory-budget 2.5GiB] [--helios throughput latency ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import helios  # noqa: E402, F401  (before torch: thread policy)
from helios import LLM, ExitConfig, SamplingParams  # noqa: E402
from helios.control import SLO  # noqa: E402
from helios.engine.engine import LLMEngine  # noqa: E402
from helios.exits.heads import MANIFEST_FILE, MODEL_SUBFOLDER, ExitHeads, find_model_heads  # noqa: E402
from helios.exits.thresholds import choose_thresholds, exit_report  # noqa: E402
from helios.model.source import resolve_model  # noqa: E402
from helios.tuning.calibration import collect_exit_stats  # noqa: E402
from helios.tuning.corpus import token_windows  # noqa: E402
from helios.tuning.tune import teacher_forcing_engine  # noqa: E402

SHARED = Path(os.environ.get("HELIOS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATA = SHARED / "data"
RESULTS = Path(__file__).resolve().parent / "results"
LN2 = 0.6931471805599453


# ---- workload ---------------------------------------------------------------------------------------------------
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def workload(per_phase: int) -> list[tuple[str, str]]:
    """(phase, prompt) in arrival order, from text that offline calibration never read: the last gsm8k test questions
    (calibration reads the first 800), windows of the last five xsum-sample articles (calibration reads the first
    five), passages of tinyshakespeare's second half (exit tuning trained on windows from the whole file)."""
    gsm = [f"Question: {r['question']}\nAnswer:" for r in _jsonl(DATA / "gsm8k" / "test.jsonl")[-per_phase:]]
    news = " ".join(r["document"] for r in _jsonl(DATA / "xsum-sample" / "sample.jsonl")[5:])
    stride = max(1, (len(news) - 300) // per_phase)
    xsum = [f"Article: {news[i * stride:i * stride + 300]}\nSummary:" for i in range(per_phase)]
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()
    tail = text[len(text) // 2:]
    passages = [tail[i * 400:i * 400 + 300] for i in range(per_phase)]
    return [("gsm8k", p) for p in gsm] + [("xsum", p) for p in xsum] + [("shakespeare", p) for p in passages]


def calibration_files(directory: Path) -> list[Path]:
    """The EE baseline's offline calibration text: held-out documents of two of the workload's domains."""
    gsm = _jsonl(DATA / "gsm8k" / "test.jsonl")[:800]
    xsum = _jsonl(DATA / "xsum-sample" / "sample.jsonl")[:5]
    files = []
    for name, records in (("gsm8k-cal", gsm), ("xsum-cal", xsum)):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        files.append(path)
    return files


# ---- the EE baseline: offline calibration at several targets ----------------------------------------------------
def offline_ee_heads(model: str, layers: list[int] | None, targets: list[float], work: Path,
                     tokens: int = 20_000) -> dict[float, Path]:
    """Heads directories (the chosen exit layers of the model's tuned heads, thresholds calibrated offline at each
    target precision) from one teacher-forced pass over the calibration text."""
    source = find_model_heads(resolve_model(model).path)
    if source is None:
        raise SystemExit(f"{model} has no tuned exit heads: run `helios tune-exits`, then pass --heads {model}=DIR")
    heads = ExitHeads.load(source)
    layers = layers or heads.layers
    missing = sorted(set(layers) - set(heads.layers))
    if missing:
        raise SystemExit(f"{model}'s heads ({source}) have no layers {missing}")
    heads.adapters = {x: heads.adapters[x] for x in layers}
    engine = teacher_forcing_engine(model, 1024)
    engine.model.exit_heads = heads
    windows = token_windows(engine.tokenizer, calibration_files(work), tokens, 256, seed=0)
    stats = collect_exit_stats(engine, windows, layers, "max_prob", 1024)
    out = {}
    for target in targets:
        thresholds = choose_thresholds(stats, target, 50)
        heads.thresholds, heads.confidence = thresholds, "max_prob"
        heads.info = {"calibration": {"target_precision": target, **exit_report(stats, thresholds)}}
        out[target] = heads.save(work / f"{Path(model).name}-ee-{target}")
    del engine
    return out


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
        finished: dict[int, float] = {}
        while engine.has_unfinished() or not all(r.is_finished for r in requests):
            engine.step()
            now = time.perf_counter()
            for i, r in enumerate(requests):
                if i not in first and engine.output(r).outputs[0].token_ids:
                    first[i] = now
                if i not in finished and r.is_finished:
                    finished[i] = now
        done = time.perf_counter()
        for i, ((phase, prompt), r) in enumerate(zip(batch, requests, strict=True)):
            out = engine.output(r).outputs[0]
            models = list(r.seqs[0].models) if hasattr(r.seqs[0], "models") else [model_name]
            n = len(out.token_ids)
            end = finished.get(i, done)
            records.append({"phase": phase, "prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                            "models": models, "exit_layers": out.exit_layers, "ttft": first.get(i, done) - arrival,
                            "tpot": (end - first.get(i, done)) / max(1, n - 1),
                            "decoding": (first.get(i, done) - started, end - started)})
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
            "observed_concurrency": _most_overlapping([r["decoding"] for r in records]),
            "weight_bytes": stats.get("weight_bytes"), "kv_blocks_total": stats.get("kv_blocks_total"),
            "kv_cache_sizing": stats.get("kv_cache_sizing"),
            "records": records, "waves": waves, "events": stats.get("events", []), "control": stats.get("control"),
            "exit_histogram": _histogram(records), "live_exit_precision": _live_precision(engine)}


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _most_overlapping(spans: list[tuple[float, float]]) -> int:
    """Most requests decoding at once (between their first token and their end)."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def _histogram(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        for layer in r["exit_layers"]:
            counts[str(layer)] = counts.get(str(layer), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


# ---- quality ------------------------------------------------------------------------------------------------------
def prefix_agreement(got: list[int], want: list[int]) -> float:
    same = 0
    for a, b in zip(got, want, strict=False):
        if a != b:
            break
        same += 1
    return same / max(1, len(want))


_SCORED: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (engine, prefix, continuation) -> teacher_forced's


@torch.inference_mode()
def teacher_forced(engine: LLMEngine, items: list[tuple[list[int], list[int]]],
                   group_tokens: int = 2048) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per (prefix ids, continuation ids): the full model's log-probability of each continuation token and its own
    argmax at that position, one forward per group of sequences (pairs scored before come from a memo: the
    judge's pass over its own model's outputs repeats the agreement pass)."""
    keys = [(id(engine), tuple(p), tuple(c)) for p, c in items]
    todo = list(dict.fromkeys(k for k in keys if k not in _SCORED))
    for key, result in zip(todo, _teacher_forced(engine, [(list(k[1]), list(k[2])) for k in todo], group_tokens),
                           strict=True):
        _SCORED[key] = result
    return [_SCORED[k] for k in keys]


def _teacher_forced(engine: LLMEngine, items: list[tuple[list[int], list[int]]],
                    group_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    results: list[tuple[torch.Tensor, torch.Tensor]] = []
    depth = engine.model.loaded_layers
    start = 0
    while start < len(items):
        end, size = start, 0
        while end < len(items) and (end == start or size + sum(map(len, items[end])) <= group_tokens):
            size += sum(map(len, items[end]))
            end += 1
        group = items[start:end]
        hidden = engine.hidden_states([p + c for p, c in group], [depth])[depth]
        offset = 0
        for prefix, cont in group:
            rows = hidden[offset + len(prefix) - 1:offset + len(prefix) + len(cont) - 1]
            log_probs = engine.model.compute_logits(rows).float().log_softmax(-1)
            target = torch.tensor(cont, device=log_probs.device)
            results.append((log_probs.gather(1, target[:, None])[:, 0].cpu(), log_probs.argmax(-1).cpu()))
            offset += len(prefix) + len(cont)
        start = end
    return results


def score_agreement(result: dict, plain: dict[str, dict], engines: dict[str, LLMEngine]) -> None:
    """Agreement with plain decoding of the model that served each request: per token (teacher forced under that
    model at full depth) and up to the first divergence. Requests two models served are counted apart ('moved')."""
    served: list[tuple[dict, str]] = []
    for i, r in enumerate(result["records"]):
        r["agreement"] = r["token_agreement"] = None
        if len(set(r["models"])) != 1 or r["models"][0] not in plain:
            continue
        model = r["models"][0]
        r["agreement"] = prefix_agreement(r["token_ids"], plain[model]["records"][i]["token_ids"])
        served.append((r, model))
    same = total = 0
    for model, engine in engines.items():
        mine = [r for r, m in served if m == model and r["token_ids"]]
        items = [(engine.make_request(r["prompt"], SamplingParams(max_tokens=1)).prompt_token_ids, r["token_ids"])
                 for r in mine]
        for r, (_, argmax) in zip(mine, teacher_forced(engine, items), strict=True):
            hits = int((argmax == torch.tensor(r["token_ids"])).sum())
            r["token_agreement"] = hits / len(r["token_ids"])
            same, total = same + hits, total + len(r["token_ids"])
    values = [r["agreement"] for r, _ in served]
    result["agreement"] = round(statistics.mean(values), 4) if values else None
    result["token_agreement"] = round(same / total, 4) if total else None
    result["mixed_requests"] = len(result["records"]) - len(served)


def bits_per_byte(judge: LLMEngine, records: list[dict]) -> float:
    """Bits per byte of the outputs under the judge model, each given its prompt (text re-tokenized by the judge)."""
    items, num_bytes = [], 0
    for r in records:
        prompt_ids = judge.tokenizer.encode(r["prompt"])
        ids = judge.tokenizer.encode(r["prompt"] + r["text"])
        if len(ids) <= len(prompt_ids) or len(ids) >= judge.max_model_len:
            continue
        items.append((ids[:len(prompt_ids)], ids[len(prompt_ids):]))
        num_bytes += len(r["text"].encode())
    nats = -sum(float(lp.sum()) for lp, _ in teacher_forced(judge, items))
    return nats / LN2 / max(1, num_bytes)


# ---- matched quality ----------------------------------------------------------------------------------------------
def envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(agreement, value) points -> the best value reachable at each agreement or above, as a falling staircase
    joined by straight lines: the baseline's most favourable curve."""
    best: list[tuple[float, float]] = []
    for agreement, value in sorted(points, reverse=True):
        if not best or value > best[-1][1]:
            best.append((agreement, value))
    return sorted(best)


def at_agreement(curve: list[tuple[float, float]], agreement: float) -> float | None:
    """The envelope's value at `agreement`: linear between points; below its lowest point that point's value (a
    baseline run at lower quality is at least as fast); above its highest point that point's value too, an upper
    bound for an EE baseline, whose stricter thresholds only take exits away while every check is still paid."""
    if not curve:
        return None
    if agreement <= curve[0][0]:
        return curve[0][1]
    for (a0, v0), (a1, v1) in zip(curve, curve[1:], strict=False):
        if a0 <= agreement <= a1:
            return v0 + (v1 - v0) * (agreement - a0) / (a1 - a0) if a1 > a0 else max(v0, v1)
    return curve[-1][1]


def matched_ratios(results: dict, models: list[str]) -> list[dict]:
    """Each HELIOS run against each model's EE curve at the token agreement HELIOS delivered (each request against
    plain decoding of the model that served it), and against that model's plain decoding."""
    rows = []
    for name, h in results.items():
        if not name.startswith("helios:") or h["token_agreement"] is None:
            continue
        for model in models:
            ee = [r for n, r in results.items() if n.startswith(f"ee:{model}@")]
            quality, plain = h["token_agreement"], results[f"plain:{model}"]
            tps = at_agreement(envelope([(r["token_agreement"], r["tokens_per_second"]) for r in ee]), quality)
            seqs = max(r["max_concurrent_seqs"] for r in ee) if ee else None
            rows.append({"helios": name, "vs": model,
                         "helios_requests_on_this_model": sum(r["models"] == [model] for r in h["records"]),
                         "helios_token_agreement": quality,
                         "ee_agreements": sorted(r["token_agreement"] for r in ee),
                         "ee_tok_s_at_that_agreement": None if tps is None else round(tps, 2),
                         "throughput_ratio_vs_ee": None if not tps else round(h["tokens_per_second"] / tps, 3),
                         "concurrent_seqs_ratio_vs_ee": None if not seqs else round(h["max_concurrent_seqs"] / seqs,
                                                                                    3),
                         "throughput_ratio_vs_plain": round(h["tokens_per_second"] / plain["tokens_per_second"], 3),
                         "plain_token_agreement": plain["token_agreement"]})
    return rows


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


def parse_helios(spec: str) -> SLO:
    """OBJECTIVE[:FIELD=VALUE,...] -> SLO (values are numbers)."""
    objective, _, rest = spec.partition(":")
    fields = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        fields[key] = float(value) if "." in value else int(value)
    return SLO(objective=objective, **fields)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--heads", nargs="*", default=[], help="MODEL=DIR: tuned heads to install")
    parser.add_argument("--ee-layers", nargs="*", default=[],
                        help="MODEL=L1,L2,...: the EE baseline's exits (default: every layer with a tuned head)")
    parser.add_argument("--ee-models", nargs="*", default=None,
                        help="models that get the EE baseline (default: every --models entry)")
    parser.add_argument("--ee-targets", nargs="*", type=float, default=[0.8, 0.9, 0.95, 0.98],
                        help="offline calibration targets of the EE baseline (one run each)")
    parser.add_argument("--calibration-tokens", type=int, default=20_000,
                        help="held-out tokens the EE baseline's offline calibration reads")
    parser.add_argument("--phase-requests", type=int, default=64)
    parser.add_argument("--wave", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--memory-budget", default="2.5GiB")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--helios", nargs="+", default=["throughput", "latency"],
                        help="HELIOS runs: OBJECTIVE[:FIELD=VALUE,...] with SLO fields, e.g. throughput:coverage=0.7")
    args = parser.parse_args()
    for item in args.heads:
        model, _, directory = item.partition("=")
        print(f"heads for {model}: {install_heads(model, Path(directory))}", file=sys.stderr)
    ee_layers = {m: [int(x) for x in spec.split(",")] for m, _, spec in (i.partition("=") for i in args.ee_layers)}
    prompts = workload(args.phase_requests)
    common = dict(memory_budget=args.memory_budget, max_model_len=args.max_model_len, dtype="float32")
    work = Path(tempfile.mkdtemp(prefix="helios-vs-baselines-"))
    ee_models = args.models if args.ee_models is None else args.ee_models
    unknown = sorted(set(ee_models) - set(args.models))
    if unknown:
        parser.error(f"--ee-models {unknown} are not in --models")
    ee_heads = {m: offline_ee_heads(m, ee_layers.get(m), args.ee_targets, work, args.calibration_tokens)
                for m in ee_models}
    results, plain = {}, {}
    for model in args.models:
        name = f"plain:{model}"
        print(f"running {name}", file=sys.stderr)
        results[name] = plain[model] = run(name, LLM(model, **common), prompts, args.wave, args.max_tokens, model)
    for model in ee_models:
        for target, heads in ee_heads[model].items():
            name = f"ee:{model}@{target}"
            print(f"running {name}", file=sys.stderr)
            results[name] = run(name, LLM(model, early_exit=ExitConfig(heads=str(heads)), **common), prompts,
                                args.wave, args.max_tokens, model)
            results[name]["offline_calibration"] = ExitHeads.load(heads).info["calibration"]
    for spec in args.helios:
        name = f"helios:{spec}"
        print(f"running {name}", file=sys.stderr)
        results[name] = run(name, LLM(args.models, slo=parse_helios(spec), **common), prompts, args.wave,
                            args.max_tokens)
    print("scoring quality", file=sys.stderr)
    engines = {m: LLM(m, dtype="float32", max_model_len=args.max_model_len, enable_prefix_caching=False,
                      kv_cache_blocks=256).engine for m in args.models}
    for result in results.values():
        score_agreement(result, plain, engines)
    # the judge: the candidate with the lowest prompt bits per byte in HELIOS' own profile
    pht = next(r["control"]["pht"] for r in results.values() if r.get("control"))
    judge_name = min(pht, key=lambda row: row["prompt_bpb"] or 1e9)["model"]
    for result in results.values():
        result["output_bpb"] = round(bits_per_byte(engines[judge_name], result["records"]), 4)
    summary = _summary(results, judge_name)
    ratios = matched_ratios(results, args.models)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"helios_vs_baselines-cpu-{stamp}.json"
    payload = {"benchmark": "helios_vs_baselines", "args": vars(args), "judge": judge_name, "summary": summary,
               "matched_quality": ratios,
               "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                           "load_average": os.getloadavg()},
               "results": {k: {**v, "records": [{k2: v2 for k2, v2 in r.items() if k2 not in ("prompt", "text")}
                                                for r in v["records"]]} for k, v in results.items()}}
    out.write_text(json.dumps(payload, indent=1, default=str))
    _plot(results, args.models, out.with_suffix(".png"))
    _print(summary, ratios)
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
                     "observed_concurrency": r["observed_concurrency"], "loaded_layers": r["loaded_layers"],
                     "token_agreement": r["token_agreement"], "prefix_agreement": r["agreement"],
                     "mixed_requests": r["mixed_requests"], f"output_bpb[{judge}]": r["output_bpb"],
                     "exit_histogram": r["exit_histogram"]})
    return rows


def _print(summary: list[dict], ratios: list[dict]) -> None:
    for row in summary:
        print(json.dumps({k: v for k, v in row.items() if k != "exit_histogram"}))
    for row in ratios:
        print(json.dumps(row))


def _plot(results: dict, models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(11, 15))
    for name, r in results.items():
        xs = [w["end"] for w in r["waves"]]
        axes[0].plot(xs, [w["tokens"] / max(1e-9, w["end"] - w["start"]) for w in r["waves"]], label=name)
        per_wave, size = [], len(r["records"]) // max(1, len(r["waves"]))
        for k in range(len(r["waves"])):
            chunk = [x["token_agreement"] for x in r["records"][k * size:(k + 1) * size]
                     if x.get("token_agreement") is not None]
            per_wave.append(statistics.mean(chunk) if chunk else float("nan"))
        axes[1].plot(xs, per_wave, label=name)
        if r.get("events"):
            t0 = r["events"][0]["time"]
            for event in r["events"]:
                if event["kind"] in ("select", "grow", "switch", "truncate"):
                    axes[0].axvline(event["time"] - t0, color="gray", alpha=0.3)
                    axes[0].text(event["time"] - t0, 0.02, f"{name.removeprefix('helios:')}: {event['kind']}",
                                 rotation=90, fontsize=5, transform=axes[0].get_xaxis_transform())
    axes[0].set_ylabel("tokens/s per wave")
    axes[1].set_ylabel("token agreement with plain")
    axes[1].set_xlabel("seconds since the configuration started")
    axes[0].legend(fontsize=6)
    for model in models:
        curve = sorted((r["token_agreement"], r["tokens_per_second"]) for n, r in results.items()
                       if (n.startswith(f"ee:{model}@") or n == f"plain:{model}") and r["token_agreement"] is not None)
        axes[2].plot([a for a, _ in curve], [t for _, t in curve], "o-", label=f"EE curve {model} (+ plain)")
    for name, r in results.items():
        if name.startswith("helios:") and r["token_agreement"] is not None:
            axes[2].plot([r["token_agreement"]], [r["tokens_per_second"]], "*", markersize=12, label=name)
    axes[2].set_xlabel("token agreement with plain decoding of the serving model (teacher forced)")
    axes[2].set_ylabel("tokens/s")
    axes[2].legend(fontsize=6)
    for name, r in results.items():
        hist = r["exit_histogram"]
        axes[3].bar([f"{name}\n{k}" for k in hist], list(hist.values()))
    axes[3].tick_params(axis="x", labelsize=5, rotation=90)
    axes[3].set_ylabel("tokens by exit layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
