"""One engine's side of bench/peers.py, run in its own process (and its own virtualenv for vLLM / llama.cpp).

Reads a job (JSON: engine, model, prompts as token ids, batch sizes, new tokens), loads the engine once, and for
each batch size runs one short warm-up and one timed greedy generation of exactly `max_tokens` tokens per prompt
(EOS ignored). Writes {batch: {"seconds", "tokens_per_s", "token_ids"}} as JSON. Imports only what its engine
needs, so it runs under any of the peers' interpreters.
Usage: python bench/peer_worker.py JOB.json RESULT.json
"""

from __future__ import annotations

import json
import sys
import time


def run_helios(job: dict):
    from helios import LLM, SamplingParams

    llm = LLM(job["model"], dtype="float32", quantization=job.get("quantization"), max_num_seqs=max(job["batches"]),
              kv_cache_dtype=job.get("kv_cache_dtype", "auto"))

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        llm.reset_prefix_cache()
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outputs]

    return generate


def run_transformers(job: dict):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False)
        return out[:, width:].tolist()

    return generate


def run_vllm(job: dict):
    from vllm import LLM, SamplingParams

    longest = max(len(p) for p in job["prompts"]) + job["max_tokens"]
    llm = LLM(model=job["model"], dtype="float32", max_num_seqs=max(job["batches"]), max_model_len=longest + 16,
              seed=0)

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    return generate


def run_llamacpp(job: dict):
    """llama.cpp through llama-cpp-python's low-level API: every sequence of the batch in one llama_batch per step
    (prompts prefilled together, then one token per sequence per decode), greedy argmax over the logits."""
    import llama_cpp
    import numpy as np

    batch_max = max(job["batches"])
    longest = max(len(p) for p in job["prompts"]) + job["max_tokens"]
    llm = llama_cpp.Llama(model_path=job["model"], n_ctx=max(512, batch_max * (longest + 8)), n_batch=2048,
                          n_ubatch=512, n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False)
    # the high-level context holds one sequence: make one that holds the whole batch (one unified KV cache)
    params = llm.context_params
    params.n_seq_max, params.kv_unified = batch_max, True
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    n_vocab = llm.n_vocab()
    batch = llama_cpp.llama_batch_init(2048, 0, batch_max)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(row: int) -> int:  # row of the batch decoded last
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(n_vocab,)).argmax())

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        out: list[list[int]] = [[] for _ in prompts]
        group: list[int] = []  # prompts prefilled together, up to 2048 tokens per llama_batch
        for s in range(len(prompts) + 1):
            if s == len(prompts) or (group and sum(len(prompts[g]) for g in group) + len(prompts[s]) > 2048):
                entries = [(t, pos, g, pos == len(prompts[g]) - 1) for g in group
                           for pos, t in enumerate(prompts[g])]
                decode(entries)
                rows = [i for i, e in enumerate(entries) if e[3]]
                for g, row in zip(group, rows, strict=True):
                    out[g].append(argmax(row))
                group = []
            if s < len(prompts):
                group.append(s)
        for step in range(1, max_tokens):
            decode([(seq[-1], len(p) + step - 1, s, True) for s, (p, seq) in enumerate(zip(prompts, out, strict=True))])
            for s, seq in enumerate(out):
                seq.append(argmax(s))
        return out

    generate.owner = llm  # the context uses llm's model: keep it alive as long as generate (else use-after-free)
    return generate


RUNNERS = {"helios": run_helios, "transformers": run_transformers, "vllm": run_vllm, "llamacpp": run_llamacpp}


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    start = time.perf_counter()
    generate = RUNNERS[job["engine"]](job)
    result = {"load_s": time.perf_counter() - start, "batches": {}}
    for b in job["batches"]:
        prompts = job["prompts"][:b]
        generate(prompts, 4)  # warm-up: compiles/allocates for this batch shape
        start = time.perf_counter()
        token_ids = generate(prompts, job["max_tokens"])
        seconds = time.perf_counter() - start
        result["batches"][str(b)] = {"seconds": seconds, "tokens_per_s": b * job["max_tokens"] / seconds,
                                     "token_ids": token_ids}
        print(f"  {job['label']} batch {b}: {b * job['max_tokens'] / seconds:.1f} tok/s", file=sys.stderr, flush=True)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
