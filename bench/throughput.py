"""helios vs transformers `generate`: greedy decoding throughput on real prompts (gsm8k questions).

Both sides get the same chat-formatted prompts ("Question: ...\nAnswer:" for a model without a chat
template), the same dtype and exactly --max-tokens new tokens (EOS ignored), and are timed alternately in one
run, so the ratio is robust to machine noise.
helios runs as it serves by default (prefix caching on, cleared before every timed run, so only the
chat template's shared system prompt inside one batch is reused); --no-prefix-caching turns it off.
Usage: python bench/throughput.py [--model smollm2-135m] [--batch-sizes 1 8 16 32] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# torch is loaded (through `common`) before helios, so both engines run with OpenMP's own wait policy, not helios'
# passive default: the comparison is the same for both sides (bench/threads.py measures the policies).
from common import greedy_agreement, gsm8k_questions, machine, save  # noqa: E402

from helios import LLM, SamplingParams  # noqa: E402


def hf_run(model, pad_id: int, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """transformers generate on the same token ids, left-padded."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    return elapsed, out[:, width:].tolist()


def helios_run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.reset_prefix_cache()  # only sharing inside this batch counts, never blocks left by an earlier run
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, [o.outputs[0].token_ids for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-prefix-caching", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(args.batch_sizes), max_model_len=1024,
              enable_prefix_caching=not args.no_prefix_caching)
    tokenizer = llm.get_tokenizer()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hf = AutoModelForCausalLM.from_pretrained(llm.stats()["model_path"], dtype=dtype).eval()
    hf.generation_config.pad_token_id = pad_id
    questions = gsm8k_questions(max(args.batch_sizes))
    chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:  # the template supplies any BOS text itself
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True) for q in questions]
    else:  # a pretrained model without a chat template (gemma3-270m): a plain prompt, with the tokenizer's BOS
        texts = [f"Question: {q}\nAnswer:" for q in questions]
    prompts = [tokenizer.encode(t, add_special_tokens=not chat) for t in texts]  # the same ids for both sides
    helios_run(llm, prompts[:2], 4)  # warm-up both sides
    hf_run(hf, pad_id, prompts[:2], 4)

    rows = []
    for batch in args.batch_sizes:
        batch_prompts = prompts[:batch]
        times = {"transformers": [], "helios": []}
        for _ in range(args.rounds):  # alternate the two so drift hits both equally
            t, hf_ids = hf_run(hf, pad_id, batch_prompts, args.max_tokens)
            times["transformers"].append(t)
            prompt_tokens_before = llm.engine.scheduler.num_prompt_tokens
            cached_before = llm.engine.scheduler.num_cached_tokens
            t, helios_ids = helios_run(llm, batch_prompts, args.max_tokens)
            times["helios"].append(t)
            hit_rate = (llm.engine.scheduler.num_cached_tokens - cached_before) / (
                llm.engine.scheduler.num_prompt_tokens - prompt_tokens_before)
        tokens = batch * args.max_tokens
        hf_tps = tokens / statistics.median(times["transformers"])
        helios_tps = tokens / statistics.median(times["helios"])
        rows.append({"batch": batch, "new_tokens": args.max_tokens, "transformers_tok_s": round(hf_tps, 1),
                     "helios_tok_s": round(helios_tps, 1), "speedup": round(helios_tps / hf_tps, 2),
                     "greedy_agreement": round(greedy_agreement(helios_ids, hf_ids), 3),
                     "prefix_cache_hit_rate": round(hit_rate, 3),
                     "times_s": {k: [round(x, 3) for x in v] for k, v in times.items()}})
        r = rows[-1]
        print(f"batch {batch:>3}: transformers {r['transformers_tok_s']:>7.1f} tok/s | helios "
              f"{r['helios_tok_s']:>7.1f} tok/s | x{r['speedup']:.2f} | agreement {r['greedy_agreement']:.3f}",
              flush=True)

    print(f"\n{args.model}, {args.dtype}, greedy, {args.max_tokens} new tokens, gsm8k test questions "
          f"({'chat template' if chat else 'Question/Answer prompts'}), "
          f"prefix caching {'off' if args.no_prefix_caching else 'on'}")
    print("| batch | transformers tok/s | helios tok/s | speedup | greedy agreement | prefix hit rate |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['transformers_tok_s']} | {r['helios_tok_s']} | {r['speedup']}x | "
              f"{r['greedy_agreement']} | {r['prefix_cache_hit_rate']} |")
    path = save("throughput", {"benchmark": "throughput", "model": args.model, "dtype": args.dtype,
                               "prompts": "chat template" if chat else "Question/Answer",
                               "prefix_caching": not args.no_prefix_caching,
                               "machine": machine(), "stats": llm.stats(), "rows": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
