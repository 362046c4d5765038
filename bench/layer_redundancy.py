"""How many of a model's layers can go at equal quality? Top-1 agreement with the whole model when k layers are left
out: the last k (truncation, what HELIOS' depth L does, here with the model's own final norm and LM head, i.e. the
logit lens) and, for comparison, the best contiguous block of k layers anywhere below the last layer (layer
dropping, which keeps the last layer). HELIOS' throughput and batch gains at equal quality need layers that can go;
the paper's exit-trained OPT / Llama models have them (85% of tokens unchanged at layer 9 of 32), these are measured.

Text: held-out windows the exit tuning never trains on (gsm8k test questions + answers, xsum articles, the second
half of tinyshakespeare), teacher forced, --seq-len tokens each, about --tokens in all, shared by every variant.
The model runs in transformers (float32) with its decoder layer list cut; the reference is the same model uncut.
Writes bench/results/layer_redundancy-cpu-<time>.json.

Usage: python bench/layer_redundancy.py [--models smollm2-135m gemma3-270m] [--drop 1 2] [--tokens 1500]
(about 10 minutes on 2 cores: one forward pass over the tokens per variant, ~60 variants)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import SHARED, machine, save  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from helios.model.source import resolve_model  # noqa: E402

DATA = SHARED / "data"


def held_out_texts() -> list[str]:
    gsm = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines() if line.strip()]
    news = [json.loads(line) for line in (DATA / "xsum-sample" / "sample.jsonl").read_text().splitlines()
            if line.strip()]
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text()
    tail = shakespeare[len(shakespeare) // 2:]
    texts = []
    for i in range(64):  # interleaved, so any token budget samples all three domains
        texts += [gsm[-1 - i]["question"] + "\n" + gsm[-1 - i]["answer"], news[-1 - i % len(news)]["document"]
                  [(i // len(news)) * 1500:(i // len(news) + 1) * 1500], tail[i * 1500:(i + 1) * 1500]]
    return [t for t in texts if t.strip()]


def windows(tokenizer, tokens: int, seq_len: int) -> list[torch.Tensor]:
    out, total = [], 0
    for text in held_out_texts():
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :seq_len]
        if ids.shape[1] < 16:
            continue
        out.append(ids)
        total += ids.shape[1]
        if total >= tokens:
            break
    return out


@torch.inference_mode()
def argmaxes(model, layers: list[nn.Module], inputs: list[torch.Tensor]) -> torch.Tensor:
    model.model.layers = nn.ModuleList(layers)
    return torch.cat([model(ids, use_cache=False).logits[0].argmax(-1) for ids in inputs])


def measure(name: str, drops: list[int], tokens: int, seq_len: int) -> dict:
    path = resolve_model(name).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = list(model.model.layers)
    total = len(layers)
    if max(drops) > total - 2:  # a block must leave the first and the last layer
        raise SystemExit(f"--drop {max(drops)}: {name} has {total} layers, so at most {total - 2} can go")
    inputs = windows(tokenizer, tokens, seq_len)
    started = time.perf_counter()
    reference = argmaxes(model, layers, inputs)

    def agreement(kept: list[nn.Module]) -> float:
        return round(float((argmaxes(model, kept, inputs) == reference).float().mean()), 4)

    rows = []
    for k in drops:
        truncated = agreement(layers[:total - k])
        # blocks [start, start + k) that leave the last layer in place; the first layers are never dropped
        blocks = {start: agreement(layers[:start] + layers[start + k:]) for start in range(1, total - k)}
        best = max(blocks, key=blocks.get)
        rows.append({"layers_left_out": k, "truncated_agreement": truncated, "best_block_start": best,
                     "best_block_agreement": blocks[best], "block_agreement": blocks})
        print(f"{name}: without {k} of {total} layers: truncated {truncated:.3f}, best block "
              f"{best}..{best + k - 1} {blocks[best]:.3f}", flush=True)
    return {"model": name, "layers": total, "tokens": int(reference.numel()), "windows": len(inputs),
            "seconds": round(time.perf_counter() - started, 1), "drops": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--drop", nargs="+", type=int, default=[1, 2], help="layers left out (k)")
    parser.add_argument("--tokens", type=int, default=1500, help="held-out tokens (about)")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    if any(k < 1 for k in args.drop):
        parser.error("--drop values must be >= 1")
    results = [measure(m, args.drop, args.tokens, args.seq_len) for m in args.models]
    path = save("layer_redundancy", {"benchmark": "layer_redundancy", "args": vars(args), "machine": machine(),
                                     "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
