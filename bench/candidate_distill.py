"""What candidate distillation costs against full-vocabulary KL, on a small run where both are affordable.

Tunes the same exits of the same model on the same text with the same seed twice, distill="full" and
distill="candidates", and reports held-out top-1 agreement with the final layer and KL (before = logit lens,
after) and the wall time of each run.
Usage: python bench/candidate_distill.py [--model gemma3-270m] [--layers 6,12,15] [--max-tokens 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine, save  # noqa: E402

from helios.tuning.tune import tune_exits  # noqa: E402

TRAIN = [SHARED / "data" / "tinyshakespeare" / "input.txt", SHARED / "data" / "gsm8k" / "train.jsonl"]
HELD_OUT = [SHARED / "data" / "xsum-sample" / "sample.jsonl", SHARED / "data" / "gsm8k" / "test.jsonl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--layers", default="6,12,15")
    parser.add_argument("--max-tokens", type=int, default=20_000)
    parser.add_argument("--eval-tokens", type=int, default=4_000)
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    for path in TRAIN + HELD_OUT:
        if not path.is_file():
            raise SystemExit(f"{path} not found: set HELIOS_SHARED (see the README's 'Data and models')")
    runs = {}
    for mode in ("full", "candidates"):
        start = time.perf_counter()
        heads = tune_exits(args.model, TRAIN, layers, eval_corpus=HELD_OUT, max_tokens=args.max_tokens,
                           eval_tokens=args.eval_tokens, distill=mode)
        runs[mode] = {"seconds": round(time.perf_counter() - start, 1), **heads.info}
        print(f"{mode}: {runs[mode]['seconds']} s, {runs[mode]['held_out']['per_exit']}", flush=True)
    print(f"\n{args.model}, {args.max_tokens} training tokens, {args.eval_tokens} held-out tokens")
    print("| exit | logit lens | full KL: agreement / KL | candidates: agreement / KL |")
    print("|---:|---:|---:|---:|")
    for layer in map(str, layers):
        full, cand = (runs[m]["held_out"]["per_exit"][layer] for m in ("full", "candidates"))
        print(f"| {layer} | {full['agreement_before']} | {full['agreement_after']} / {full['kl_after']} | "
              f"{cand['agreement_after']} / {cand['kl_after']} |")
    print(f"| time | | {runs['full']['seconds']} s | {runs['candidates']['seconds']} s |")
    path = save("candidate_distill", {"benchmark": "candidate_distill", "model": args.model, "layers": layers,
                                      "max_tokens": args.max_tokens, "eval_tokens": args.eval_tokens,
                                      "machine": machine(), "runs": runs})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
