"""Exit tuning measured on held-out text: agreement before/after, calibration, served quality.

1. Tune exits (smollm2-135m: 10/20/24 of 30; gemma3-270m: 6/12/15 of 18; or --layers) on tinyshakespeare +
   gsm8k train (~200k tokens), timed (skipped with --heads DIR when DIR already holds heads).
2. Held-out text never trained on, split in two: the xsum sample and gsm8k test (questions + answers), first
   half of each = calibration split, second half = test split. Per exit: top-1 agreement with the last layer on
   the test split before tuning (logit lens) and after.
3. Per target precision: thresholds chosen on the calibration split, then exit rate + precision of those
   thresholds on the calibration split and on the unseen test split.
4. Served text: gsm8k test questions (chat template) generated greedily with the calibrated tuned exits vs
   plain decoding (timed alternately): throughput, exit rate, teacher-forced agreement and perplexity under
   the full model. A model without a chat template gets "Question: ...\nAnswer:" prompts instead.
Usage: python bench/exit_tuning.py [--model smollm2-135m] [--layers 10,20,24] [--heads DIR] [--max-tokens 200000]
       [--targets 0.9,0.95,0.98]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine, save  # noqa: E402
from early_exit import compare_with_plain, timed_generate  # noqa: E402

from helios import LLM, ExitConfig, SamplingParams  # noqa: E402
from helios.exits.heads import ExitAdapter, ExitHeads  # noqa: E402
from helios.tuning.calibration import choose_thresholds, collect_exit_stats, exit_report  # noqa: E402
from helios.tuning.corpus import token_windows  # noqa: E402
from helios.tuning.tune import tune_exits  # noqa: E402

DEFAULT_LAYERS = {"smollm2-135m": [10, 20, 24], "gemma3-270m": [6, 12, 15]}  # about 1/3, 2/3 and 4/5 deep
DATA = SHARED / "data"
TRAIN = [DATA / "tinyshakespeare" / "input.txt", DATA / "gsm8k" / "train.jsonl"]
HELD_OUT = [DATA / "xsum-sample" / "sample.jsonl", DATA / "gsm8k" / "test.jsonl"]


def split_held_out(directory: Path) -> tuple[list[Path], list[Path]]:
    """First half of each held-out file's records → calibration split, second half → test split."""
    calibration, test = [], []
    for path in HELD_OUT:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        half = len(lines) // 2
        for name, part, bucket in (("cal", lines[:half], calibration), ("test", lines[half:], test)):
            out = directory / f"{path.parent.name}-{name}.jsonl"
            out.write_text("\n".join(part) + "\n")
            bucket.append(out)
    return calibration, test


def agreement(stats) -> dict[int, float]:
    return {layer: round(float(stats.agree[layer].float().mean()), 4) for layer in stats.layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default=None, help="exit layers, e.g. 10,20,24 (default: per model)")
    parser.add_argument("--heads", default=None, help="reuse (or write) tuned heads here")
    parser.add_argument("--max-tokens", type=int, default=200_000)
    parser.add_argument("--eval-tokens", type=int, default=20_000, help="tokens per held-out split")
    parser.add_argument("--targets", default="0.9,0.95,0.98")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tune-options", default="{}", help="JSON of extra TuneConfig fields")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    layers = [int(x) for x in args.layers.split(",")] if args.layers else DEFAULT_LAYERS[args.model]
    work = Path(tempfile.mkdtemp(prefix="helios-exit-bench-"))
    heads_dir = Path(args.heads) if args.heads else work / "heads"
    calibration_files, test_files = split_held_out(work)

    tuning = None
    if not (heads_dir / "manifest.json").is_file():
        start = time.perf_counter()
        heads = tune_exits(args.model, TRAIN, layers, heads_dir, eval_corpus=HELD_OUT, max_tokens=args.max_tokens,
                           **json.loads(args.tune_options))
        tuning = {"wall_seconds": round(time.perf_counter() - start, 1), **heads.info}
        print(f"tuned in {tuning['wall_seconds']:.0f} s: {json.dumps(heads.info['held_out']['per_exit'])}",
              flush=True)
    heads = ExitHeads.load(heads_dir)

    scorer = LLM(args.model, dtype="float32", enable_prefix_caching=False, kv_cache_blocks=256, max_model_len=1024)
    engine, model = scorer.engine, scorer.engine.model
    tok = engine.tokenizer
    cal_windows = token_windows(tok, calibration_files, args.eval_tokens, 256, seed=1)
    test_windows = token_windows(tok, test_files, args.eval_tokens, 256, seed=2)
    identity = ExitHeads(heads.fingerprint, {k: ExitAdapter.identity(model.hidden_size) for k in layers})
    model.exit_heads = identity
    before = collect_exit_stats(engine, test_windows, layers, progress=True)
    model.exit_heads = heads
    cal_stats = collect_exit_stats(engine, cal_windows, layers, progress=True)
    test_stats = collect_exit_stats(engine, test_windows, layers, progress=True)
    model.exit_heads = None
    lens, tuned = agreement(before), agreement(test_stats)
    print(f"\nheld-out test split: top-1 agreement with layer {model.total_layers}")
    print("| exit layer | logit lens | tuned |\n|---:|---:|---:|")
    for layer in layers:
        print(f"| {layer} | {lens[layer]} | {tuned[layer]} |")

    calibration = []
    print("\n| target | exit | threshold | exit rate (cal) | precision (cal) | exit rate (test) | precision (test) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for target in targets:
        thresholds = choose_thresholds(cal_stats, target)
        on_cal, on_test = exit_report(cal_stats, thresholds), exit_report(test_stats, thresholds)
        calibration.append({"target": target, "thresholds": thresholds, "calibration_split": on_cal,
                            "test_split": on_test})
        for layer in layers:
            c, t = on_cal["per_exit"][layer], on_test["per_exit"][layer]
            print(f"| {target} | {layer} | {c['threshold']} | {c['exit_rate']} | {c['precision']} | "
                  f"{t['exit_rate']} | {t['precision']} |")
        print(f"| {target} | all | | {on_cal['early_exit_rate']} | {on_cal['early_exit_precision']} | "
              f"{on_test['early_exit_rate']} | {on_test['early_exit_precision']} |", flush=True)
    del scorer

    common = dict(max_model_len=1024, max_num_seqs=args.prompts)
    plain = LLM(args.model, **common)
    questions = [json.loads(line)["question"] for line in test_files[1].read_text().splitlines()[:args.prompts]]
    # gsm8k test questions of the test split (never used for calibration)
    if getattr(tok, "chat_template", None):
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    else:
        prompts = [f"Question: {q}\nAnswer:" for q in questions]
    params = SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True)
    plain_outs, _ = timed_generate(plain, prompts, params)
    plain_ids = [o.outputs[0].token_ids for o in plain_outs]
    served = [compare_with_plain("plain", plain, plain, prompts, params, plain_ids, args.rounds)]
    for entry in calibration:
        target_dir = work / f"heads-{entry['target']}"
        shutil.copytree(heads_dir, target_dir, dirs_exist_ok=True)
        calibrated = ExitHeads.load(target_dir)
        calibrated.thresholds, calibrated.confidence = entry["thresholds"], "max_prob"
        calibrated.save(target_dir)
        llm = LLM(args.model, early_exit=ExitConfig(heads=target_dir), **common)
        served.append(compare_with_plain(f"tuned, calibrated at {entry['target']}", llm, plain, prompts, params,
                                         plain_ids, args.rounds))
    print("\n| exits | tok/s | vs plain | early-exit rate | teacher-forced agreement | perplexity (full model) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in served:
        print(f"| {r['config']} | {r['tok_s']} | {r['vs_plain']:.2f}x | {r['early_exit_rate']} | "
              f"{r['teacher_forced_agreement']} | {r['perplexity']} |")
    path = save("exit_tuning", {
        "benchmark": "exit_tuning", "model": args.model, "machine": machine(), "layers": layers,
        "train_files": [p.name for p in TRAIN], "held_out_files": [p.name for p in HELD_OUT], "tuning": tuning,
        "heads_manifest": json.loads((heads_dir / "manifest.json").read_text()),
        "agreement_test_split": {"logit_lens": lens, "tuned": tuned, "tokens": test_stats.num_tokens},
        "calibration": calibration, "served": served,
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
