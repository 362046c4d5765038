"""Early exit on smollm2-135m with real prompts: costs, how untuned exits behave, and throughput vs quality.

1. Costs per decode step (batch 1 and 16, ~150-token contexts): one layer, one exit check (fused norm +
   LM head + confidence), one K/V fill of a skipped layer (hidden-state propagation), relative to a layer.
2. Logit lens: per layer, how often the layer's own argmax equals the last layer's, and its mean max prob,
   teacher-forced over prompts + plain continuations.
3. For several exit configurations, each timed alternately with plain decoding (the ratio comes from those
   paired runs): throughput, exit histogram, breaches, and the quality it was bought at:
   teacher-forced agreement of the generated tokens with the full model, perplexity of the generated text
   under the full model, and agreement with plain greedy decoding (up to the first divergence).
Usage: python bench/early_exit.py [--prompts 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gsm8k_questions, machine, save  # noqa: E402

from helios import LLM, ExitConfig, SamplingParams  # noqa: E402
from helios.engine.scheduler import ScheduledSeq  # noqa: E402
from helios.engine.sequence import Sequence  # noqa: E402


def median_time(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def step_costs(llm: LLM, batch: int, context: int = 150) -> dict:
    eng = llm.engine
    model, alloc = eng.model, eng.kv_cache.allocator
    seqs = []
    for _ in range(batch):
        seq = Sequence("cost", "", list(range(100, 100 + context)), SamplingParams())
        alloc.ensure_capacity(seq.seq_id, context)
        seq.num_computed_tokens = context - 1
        seqs.append(seq)
    try:
        ids, pos, meta, _ = eng.runner.prepare([ScheduledSeq(s, 1) for s in seqs])
        hidden = torch.randn(batch, model.hidden_size) * 0.5
        kv = eng.kv_cache.layer(10)
        layer = median_time(lambda: model.layer(10, hidden, pos, kv, meta))
        check = median_time(lambda: model.exit_head(hidden))
        fill = median_time(lambda: model.fill_kv(10, hidden, pos, kv, meta.slot_mapping))
    finally:
        for s in seqs:
            alloc.free_sequence(s.seq_id)
    return {"batch": batch, "layer_ms": round(layer * 1e3, 3), "exit_check_ms": round(check * 1e3, 3),
            "kv_fill_ms": round(fill * 1e3, 3), "exit_check_in_layers": round(check / layer, 2),
            "kv_fill_vs_layer": round(fill / layer, 3)}


def hidden_per_layer(llm: LLM, token_ids: list[int]) -> list[torch.Tensor]:
    """Hidden state of every position after every loaded layer (teacher-forced)."""
    depth = llm.engine.model.loaded_layers
    states = llm.engine.hidden_states([token_ids], list(range(1, depth + 1)))
    return [states[layer] for layer in range(1, depth + 1)]


def logit_lens(llm: LLM, outputs) -> list[dict]:
    depth = llm.engine.model.loaded_layers
    agree = [0] * depth
    max_prob = [0.0] * depth
    count = 0
    for out in outputs:
        ids = out.prompt_token_ids + out.outputs[0].token_ids
        first = len(out.prompt_token_ids) - 1  # positions that predict the generated tokens
        states = hidden_per_layer(llm, ids)
        final = llm.engine.model.exit_head(states[-1][first:-1])[0]
        for layer, h in enumerate(states):
            token, p1, _, _ = llm.engine.model.exit_head(h[first:-1])
            agree[layer] += int((token == final).sum())
            max_prob[layer] += float(p1.sum())
        count += len(ids) - 1 - first
    return [{"layer": i + 1, "agreement_with_last": round(agree[i] / count, 3),
             "mean_max_prob": round(max_prob[i] / count, 3)} for i in range(depth)]


def quality(reference: LLM, outputs, plain_ids) -> dict:
    """Teacher-forced agreement and perplexity of generated tokens under the full model."""
    agree = total = 0
    nll = 0.0
    prefix_same = 0
    for out, plain in zip(outputs, plain_ids, strict=True):
        gen = out.outputs[0].token_ids
        ids = out.prompt_token_ids + gen
        logits = reference.engine.prompt_logits(ids)[len(out.prompt_token_ids) - 1:-1]
        agree += int((logits.argmax(-1) == torch.tensor(gen)).sum())
        nll -= float(logits.log_softmax(-1).gather(1, torch.tensor(gen)[:, None]).sum())
        total += len(gen)
        for a, b in zip(gen, plain, strict=False):
            if a != b:
                break
            prefix_same += 1
    return {"teacher_forced_agreement": round(agree / total, 3), "perplexity": round(math.exp(nll / total), 2),
            "plain_greedy_agreement": round(prefix_same / total, 3)}


def timed_generate(llm: LLM, prompts, params):
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, time.perf_counter() - start


def compare_with_plain(name: str, llm: LLM, plain: LLM, prompts, params, plain_ids, rounds: int) -> dict:
    """Throughput of `llm` relative to plain decoding (timed alternately), its exits, and the quality of what
    it generated under the full model."""
    timed_generate(llm, prompts, params)  # warm-up
    # alternate with plain decoding in ABBA order, so that drift and run-order effects cancel in the ratio
    runs, plain_runs = [], []
    for r in range(rounds):
        if r % 2:
            plain_runs.append(timed_generate(plain, prompts, params)[1])
        outs, elapsed = timed_generate(llm, prompts, params)
        runs.append(elapsed)
        if r % 2 == 0:
            plain_runs.append(timed_generate(plain, prompts, params)[1])
    # minimum, not median: on a shared VM noise only ever adds time (plain vs plain medians differed by 30%)
    elapsed, plain_elapsed = min(runs), min(plain_runs)
    stats = llm.stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    hist = {}
    for o in outs:
        for layer in o.outputs[0].exit_layers:
            hist[layer] = hist.get(layer, 0) + 1
    early = sum(n for layer, n in hist.items() if layer < stats["loaded_layers"]) / tokens
    policy, depth = llm.engine.exit_policy, stats["loaded_layers"]
    breaches = sum(1 for o in outs for layer, c in zip(o.outputs[0].exit_layers, o.outputs[0].confidences,
                                                          strict=True)
                   if policy is not None and layer == depth and not bool(
                       policy.passes(depth, torch.tensor(c), torch.tensor(0.0), torch.tensor(c))))
    row = {"config": name, "tok_s": round(tokens / elapsed, 1), "vs_plain": round(plain_elapsed / elapsed, 2),
           "early_exit_rate": round(early, 3),
           "exit_histogram": dict(sorted(hist.items())), "breaches": breaches,
           **quality(plain, outs, plain_ids)}
    print(f"{name:<34} {row['tok_s']:>7} tok/s | {row['vs_plain']:.2f}x plain | early {row['early_exit_rate']:.3f} | "
          f"agree(teacher) {row['teacher_forced_agreement']} | ppl {row['perplexity']} | "
          f"plain-greedy {row['plain_greedy_agreement']} | {row['exit_histogram']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    common = dict(max_model_len=1024, max_num_seqs=args.prompts)
    plain = LLM(args.model, **common)
    tok = plain.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in gsm8k_questions(args.prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    costs = [step_costs(plain, b) for b in (1, 16)]
    print("per decode step (layer 11 of 30, ~150-token context):")
    for c in costs:
        print(f"  batch {c['batch']:>2}: layer {c['layer_ms']} ms | exit check {c['exit_check_ms']} ms "
              f"(= {c['exit_check_in_layers']} layers) | K/V fill of a skipped layer {c['kv_fill_ms']} ms "
              f"(= {c['kv_fill_vs_layer']:.0%} of a layer)")

    plain_outs, _ = timed_generate(plain, prompts, params)
    plain_ids = [o.outputs[0].token_ids for o in plain_outs]
    lens = logit_lens(plain, plain_outs)
    print("\nlogit lens (untuned exits), teacher-forced on prompts + plain continuations:")
    print("| layer | agreement with layer 30 | mean max prob |\n|---:|---:|---:|")
    for row in lens:
        if row["layer"] % 5 == 0 or row["layer"] in (1, 27, 28, 29):
            print(f"| {row['layer']} | {row['agreement_with_last']} | {row['mean_max_prob']} |")

    configs = [("plain", None)] + [
        (f"auto (15,20,25,30) max_prob>={t}", ExitConfig(layers="auto", threshold=t)) for t in (0.9, 0.7, 0.5)] + [
        ("all layers max_prob>=0.9", ExitConfig(layers="all", threshold=0.9)),
        ("[24,27] max_prob>=0.8", ExitConfig(layers=[24, 27], threshold=0.8)),
        ("auto entropy<=0.5", ExitConfig(layers="auto", confidence="entropy", threshold=0.5)),
    ]
    rows = []
    for name, config in configs:
        llm = plain if config is None else LLM(args.model, early_exit=config, **common)
        rows.append(compare_with_plain(name, llm, plain, prompts, params, plain_ids, args.rounds))

    print(f"\n{args.model}, float32, greedy, {args.prompts} gsm8k prompts (chat template), "
          f"{args.max_tokens} new tokens")
    print("| exits | tok/s | vs plain | early-exit rate | teacher-forced agreement | perplexity (full model) | "
          "plain-greedy agreement |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['tok_s']} | {r['vs_plain']:.2f}x | {r['early_exit_rate']} | "
              f"{r['teacher_forced_agreement']} | {r['perplexity']} | {r['plain_greedy_agreement']} |")
    path = save("early_exit", {"benchmark": "early_exit", "model": args.model, "machine": machine(),
                               "costs": costs, "logit_lens": lens, "rows": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
