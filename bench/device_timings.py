"""The timed sections of bench/device_check.py: measured ceilings, the exit head, paged attention, one engine
decode step against its floor, and engine throughput against transformers `generate`.

Every kernel is timed on random data (never zeros) and checked against its baseline's output in the same run.
On CUDA: triton.testing.do_bench medians (warm-up, L2 flushed between runs); on CPU (the --smoke run that CI
exercises) perf_counter medians. Sizes are arguments, so the smoke run takes the same code paths at tiny sizes.
"""

from __future__ import annotations

import shutil
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from common import greedy_agreement

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

# Real model shapes (their public configs); the weights are random, speed does not depend on their values.
MODEL_SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # the --smoke run's stand-in
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=512,
                 rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def time_ms(fn, device: torch.device) -> float:
    """Median milliseconds of fn() after warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- ceilings ---------------------------------------------------------------------------------------------------

def ceilings(device: torch.device, copy_bytes: int, gemm_n: int, dtype: torch.dtype) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and the dense GEMM rate of `dtype`."""
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    a = torch.randn(gemm_n, gemm_n, device=device, dtype=dtype)
    b = torch.randn(gemm_n, gemm_n, device=device, dtype=dtype)
    gemm_ms = time_ms(lambda: a @ b, device)
    return {"copy_bytes": copy_bytes, "copy_ms": copy_ms, "bandwidth_bytes_s": 2 * copy_bytes / (copy_ms * 1e-3),
            "gemm_n": gemm_n, "gemm_dtype": str(dtype).removeprefix("torch."), "gemm_ms": gemm_ms,
            "gemm_flop_s": 2 * gemm_n**3 / (gemm_ms * 1e-3)}


# ---- exit head --------------------------------------------------------------------------------------------------

def exit_head_rows(device: torch.device, shapes: dict[str, tuple[int, int]], batches: list[int], dtype: torch.dtype,
                   bandwidth: float) -> list[dict]:
    """Fused exit head (Triton on CUDA, interpreted on CPU) vs the unfused torch chain vs reading the LM head once."""
    from helios.ops import exit_head
    from helios.ops.exit_head import exit_head_unfused
    from helios.ops.norm import Norm

    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for name, (dim, vocab) in shapes.items():
        lm_head = (torch.randn(vocab, dim, device=device, generator=g) * 3 / dim**0.5).to(dtype)
        weight = (1 + 0.1 * torch.randn(dim, device=device, generator=g)).to(dtype)
        norm = Norm("rms", weight, None, 1e-5)
        head_bytes = lm_head.numel() * lm_head.element_size()
        for batch in batches:
            hidden = (2 * torch.randn(batch, dim, device=device, generator=g)).to(dtype)
            fused = partial(exit_head, hidden, lm_head, weight, norm="rms", eps=1e-5, backend="triton")
            unfused = partial(exit_head_unfused, hidden, lm_head, norm)
            got, want = fused(), unfused()
            fused_ms, unfused_ms = time_ms(fused, device), time_ms(unfused, device)
            floor_ms = head_bytes / bandwidth * 1e3
            rows.append({"shape": name, "dim": dim, "vocab": vocab, "batch": batch,
                         "dtype": str(dtype).removeprefix("torch."), "fused_ms": fused_ms, "unfused_ms": unfused_ms,
                         "floor_ms": floor_ms, "fused_over_floor": fused_ms / floor_ms,
                         "speedup_vs_unfused": unfused_ms / fused_ms,
                         "token_agreement": (got[0] == want[0]).float().mean().item(),
                         "max_p1_diff": (got[1] - want[1].float()).abs().max().item()})
    return rows


# ---- paged attention --------------------------------------------------------------------------------------------

def paged_attention_rows(device: torch.device, layouts: dict[str, tuple[int, int, int]], batches: list[int],
                         contexts: list[int], dtype: torch.dtype, bandwidth: float, block_size: int = 16) -> list[dict]:
    """Decode (one query per sequence) through helios' paged kernel vs torch SDPA over the same K/V gathered into
    dense tensors beforehand (the gather is not timed: SDPA gets the best case). Floor: reading the K/V once."""
    from helios._ext import load_extension

    load_extension()
    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    for name, (heads, kv_heads, dim) in layouts.items():
        for batch in batches:
            for context in contexts:
                blocks_per_seq = -(-context // block_size)
                num_blocks = batch * blocks_per_seq + 7
                cache_shape = (num_blocks, block_size, kv_heads, dim)
                key_cache = torch.randn(cache_shape, device=device, generator=g).to(dtype)
                value_cache = torch.randn(cache_shape, device=device, generator=g).to(dtype)
                order = torch.randperm(num_blocks, device=device, generator=g)[: batch * blocks_per_seq]
                tables = order.view(batch, blocks_per_seq).to(torch.int32)  # scattered blocks
                seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
                starts = torch.arange(batch + 1, dtype=torch.int32, device=device)
                query = torch.randn(batch, heads, dim, device=device, generator=g).to(dtype)
                out = torch.empty_like(query)
                scale = dim**-0.5
                positions = torch.arange(context, device=device)
                slots = tables.long()[:, positions // block_size] * block_size + positions % block_size  # [B, ctx]
                keys = key_cache.view(-1, kv_heads, dim)[slots].transpose(1, 2).contiguous()  # [B, kv, ctx, dim]
                values = value_cache.view(-1, kv_heads, dim)[slots].transpose(1, 2).contiguous()
                paged = partial(_paged_decode, out, query, key_cache, value_cache, tables, seq_lens, starts, scale)
                sdpa = partial(_dense_decode, query, keys, values, scale)
                diff = (paged().float() - sdpa().float()).abs().max().item()
                paged_ms, sdpa_ms = time_ms(paged, device), time_ms(sdpa, device)
                kv_bytes = 2 * batch * context * kv_heads * dim * key_cache.element_size()
                floor_ms = kv_bytes / bandwidth * 1e3
                rows.append({"layout": name, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "batch": batch,
                             "context": context, "dtype": str(dtype).removeprefix("torch."), "paged_ms": paged_ms,
                             "sdpa_ms": sdpa_ms, "floor_ms": floor_ms, "paged_over_floor": paged_ms / floor_ms,
                             "sdpa_over_paged": sdpa_ms / paged_ms, "max_abs_diff": diff})
    return rows


def _paged_decode(out, query, key_cache, value_cache, tables, seq_lens, starts, scale):
    torch.ops.helios.paged_attention(out, query, key_cache, value_cache, tables, seq_lens, starts, scale, -1)
    return out


def _dense_decode(query, keys, values, scale):
    """query [B, heads, dim] over keys/values [B, kv_heads, context, dim]."""
    return F.scaled_dot_product_attention(query[:, :, None], keys, values, scale=scale,
                                          enable_gqa=query.shape[1] != keys.shape[1])[:, :, 0]


# ---- models with real shapes ------------------------------------------------------------------------------------

def model_dir(name: str, root: Path, tokenizer_dir: Path) -> Path:
    """A directory with the shape's config.json and a borrowed tokenizer (ids stay below any vocab here)."""
    from transformers import LlamaConfig

    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**MODEL_SHAPES[name], bos_token_id=1, eos_token_id=2).save_pretrained(directory)
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).is_file():
            shutil.copy(tokenizer_dir / file, directory / file)
    return directory


def random_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=g).tolist()  # ids 0..2 are special


def read_bytes_per_step(model) -> int:
    """Weights a decode step must read: every loaded layer, the final norm and the LM head once. The embedding is
    only indexed (B rows), unless it is also the head itself (tied, and no separately packed copy of the head)."""
    embed = model.embed_tokens.numel() * model.embed_tokens.element_size()
    head_is_embedding = model.lm_head is model.embed_tokens and model.head.nbytes == 0
    return model.weight_bytes - (0 if head_is_embedding else embed)


def decode_step_rows(device: torch.device, name: str, directory: Path, batches: list[int], prompt_len: int,
                     steps: int, dtype: torch.dtype, bandwidth: float, flop_rate: float) -> list[dict]:
    """One engine decode step (all `batch` sequences decoding, dummy weights) vs its floors: bytes (weights read +
    K/V read) over the copy bandwidth, and FLOPs over the measured GEMM rate."""
    from helios import LLM, SamplingParams

    blocks = max(batches) * (-(-(prompt_len + steps + 2) // 16)) + 16
    llm = LLM(directory, device=device, dtype=dtype, load_format="dummy", kv_cache_blocks=blocks,
              max_model_len=prompt_len + steps + 16, max_num_seqs=max(batches), max_num_batched_tokens=8192,
              enable_prefix_caching=False)
    engine, model = llm.engine, llm.engine.model
    weight_read = read_bytes_per_step(model)
    layer_params = (model.num_parameters - model.embed_tokens.numel()
                    + (model.lm_head.numel() if model.lm_head is model.embed_tokens else 0))
    rows = []
    for batch in batches:
        params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
        requests = [engine.make_request(ids, params)
                    for ids in random_prompts(batch, prompt_len, min(model.vocab_size, 32000), seed=batch)]
        for request in requests:
            engine.add_request(request)
        seqs = [request.seqs[0] for request in requests]
        times, contexts = [], []
        while engine.has_unfinished():
            decoding = all(s.num_output_tokens >= 1 for s in seqs)
            context = sum(s.num_tokens for s in seqs)
            start = time.perf_counter()
            engine.step()  # returns host lists: the step's device work is done when it returns
            sync(device)
            if decoding:
                times.append(time.perf_counter() - start)
                contexts.append(context)
        step_ms = statistics.median(times[2:] or times) * 1e3
        kv_read = engine.kv_bytes_per_token * statistics.median(contexts)
        bytes_floor_ms = (weight_read + kv_read) / bandwidth * 1e3
        flops = 2 * batch * layer_params + 4 * statistics.median(contexts) * model.num_heads * model.head_dim * \
            model.loaded_layers
        flops_floor_ms = flops / flop_rate * 1e3
        floor_ms = max(bytes_floor_ms, flops_floor_ms)
        rows.append({"model": name, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                     "context": prompt_len + steps // 2, "step_ms": step_ms, "tokens_per_s": batch / step_ms * 1e3,
                     "weight_bytes_read": weight_read, "kv_bytes_read": int(kv_read),
                     "bytes_floor_ms": bytes_floor_ms, "flops_floor_ms": flops_floor_ms,
                     "step_over_floor": step_ms / floor_ms, "decode_steps_timed": len(times)})
    return rows


def throughput_rows(device: torch.device, name: str, root: Path, tokenizer_dir: Path, batches: list[int],
                    prompt_len: int, new_tokens: int, dtype: torch.dtype, rounds: int = 2) -> list[dict]:
    """helios vs transformers `generate` on the same random-weight model (saved once, loaded by both), the same
    token-id prompts and exactly `new_tokens` greedy tokens each, timed alternately; medians of `rounds`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from helios import LLM, SamplingParams

    directory = model_dir(name, root, tokenizer_dir)
    torch.manual_seed(0)
    with torch.device(device):  # random init where the model runs (seconds for 1B parameters on a GPU)
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype).eval()
    hf.save_pretrained(directory)
    hf.generation_config.eos_token_id = None  # exactly new_tokens on both sides
    hf.generation_config.pad_token_id = 0
    blocks = max(batches) * (-(-(prompt_len + new_tokens + 1) // 16)) + 16
    llm = LLM(directory, device=device, dtype=dtype, kv_cache_blocks=blocks, max_num_seqs=max(batches),
              max_model_len=prompt_len + new_tokens + 16)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def run_hf(prompts):
        ids = torch.tensor(prompts, device=device)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)
        sync(device)
        return time.perf_counter() - start, out[:, prompt_len:].tolist()

    def run_helios(prompts):
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - start, [o.outputs[0].token_ids for o in outs]

    warm = random_prompts(2, prompt_len, min(hf.config.vocab_size, 32000), seed=99)
    run_hf(warm)
    run_helios(warm)
    rows = []
    for batch in batches:
        prompts = random_prompts(batch, prompt_len, min(hf.config.vocab_size, 32000), seed=batch)
        times = {"transformers": [], "helios": []}
        for _ in range(rounds):  # alternate, so drift hits both sides alike
            t, hf_ids = run_hf(prompts)
            times["transformers"].append(t)
            t, helios_ids = run_helios(prompts)
            times["helios"].append(t)
        tokens = batch * new_tokens
        hf_tps = tokens / statistics.median(times["transformers"])
        helios_tps = tokens / statistics.median(times["helios"])
        rows.append({"model": name, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                     "prompt_tokens": prompt_len, "new_tokens": new_tokens, "transformers_tok_s": hf_tps,
                     "helios_tok_s": helios_tps, "speedup": helios_tps / hf_tps,
                     "greedy_agreement": greedy_agreement(helios_ids, hf_ids),
                     "times_s": {k: [round(x, 4) for x in v] for k, v in times.items()}})
    return rows


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
