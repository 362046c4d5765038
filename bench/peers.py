"""helios vs its peers on this CPU: greedy decode throughput at batch 1/8/16/32 and the quality each run bought.

Engines: helios (float32, int8, int4 weights) and transformers `generate` in this environment; vLLM CPU and
llama.cpp (F32, F16 and Q4_1 GGUFs) when their virtualenvs are given (--vllm-python, --llamacpp-python; set-up in
the README). Everyone gets the same chat-formatted gsm8k prompts as token ids and generates exactly --max-tokens
tokens greedily (EOS ignored). Each engine runs in its own process (bench/peer_worker.py), rounds interleave the
engines (the order rotates each round), and every figure is the median of the rounds with min and max beside it;
the load average is recorded before each engine. helios runs with its default thread policy (waiting OpenMP threads
sleep; README "CPU threads"); --omp-active adds each helios engine again with spinning threads, the setting for a
machine dedicated to helios (vLLM and llama.cpp keep their threads spinning).

Quality, against helios float32 at the same batch size: greedy agreement (share of tokens up to each prompt's first
divergence) and the perplexity of each engine's generated text under the float32 model (transformers, teacher
forced), as a ratio to float32's own.
The float GGUFs llama.cpp reads are written from the model's Q4_1 GGUF (dequantized, as helios and transformers
load it), so every engine serves the same weights.
Use --skip to leave engines out.
Usage: python bench/peers.py [--vllm-python PATH] [--llamacpp-python PATH] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, greedy_agreement, gsm8k_questions, machine, save  # noqa: E402

WORKER = ROOT / "bench" / "peer_worker.py"
GGUF_Q4_1 = SHARED / "models" / "smollm2-135m-instruct-q4_1"


def q4_1_gguf() -> Path:
    files = sorted(GGUF_Q4_1.glob("*.gguf")) if GGUF_Q4_1.is_dir() else []
    if not files:
        raise SystemExit(f"no .gguf in {GGUF_Q4_1}: set HELIOS_SHARED to the folder holding models/")
    return files[0]


def write_float_gguf(python: str, source: Path, target: Path, kind: str) -> None:
    """A copy of `source` with every tensor dequantized to F32 (kind "f32") or F16 (matrices; vectors stay F32, as
    llama.cpp's converter writes them), metadata unchanged. Runs in the llama.cpp venv, which has `gguf`."""
    if target.exists():
        return
    script = r'''
import sys
import numpy as np
from gguf import GGUFReader, GGUFWriter, GGUFValueType, GGMLQuantizationType
from gguf.quants import dequantize
src, dst, kind = sys.argv[1:4]
reader = GGUFReader(src)
arch = reader.fields["general.architecture"].contents()
writer = GGUFWriter(dst + ".part", arch)
for name, field in reader.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
        continue
    vtype = field.types[0]
    sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
    writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
for t in reader.tensors:
    data = dequantize(t.data, t.tensor_type).astype(np.float32)
    data = data.reshape([int(d) for d in reversed(t.shape)])
    if kind == "f16" and data.ndim >= 2:
        data = data.astype(np.float16)
    writer.add_tensor(t.name, data)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
import os
os.replace(dst + ".part", dst)
'''
    subprocess.run([python, "-c", script, str(source), str(target), kind], check=True)


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    questions = gsm8k_questions(count)
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for q in questions]


def load_average() -> float:
    return os.getloadavg()[0]


def run_worker(python: str, job: dict, workdir: Path) -> dict:
    job_file, result_file = workdir / f"{job['label']}.job.json", workdir / f"{job['label']}.result.json"
    job_file.write_text(json.dumps(job))
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))  # vLLM binds one OpenMP thread per listed CPU
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="4",
               VLLM_CPU_OMP_THREADS_BIND=cpus, VLLM_ENABLE_V1_MULTIPROCESSING="0", **job.get("env", {}))
    subprocess.run([python, str(WORKER), str(job_file), str(result_file)], check=True, env=env)
    return json.loads(result_file.read_text())


def perplexity(model, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """exp(mean NLL of the generated tokens) under `model`, teacher forced on prompt + generation."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for prompt, generated in zip(prompts, outputs, strict=True):
            ids = torch.tensor([prompt + generated])
            logprobs = model(ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
            total -= logprobs.gather(1, torch.tensor(generated)[:, None]).sum().item()
            count += len(generated)
    return float(torch.tensor(total / count).exp())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vllm-python", default=None, help="python of a virtualenv with vllm-cpu installed")
    parser.add_argument("--llamacpp-python", default=None, help="python of a virtualenv with llama-cpp-python + gguf")
    parser.add_argument("--skip", nargs="*", default=[], help="engine labels to leave out, e.g. transformers")
    parser.add_argument("--omp-active", action="store_true",
                        help="also run each helios engine with OMP_WAIT_POLICY=ACTIVE (labels ending in -active)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also run each helios engine without the fused decode stack (HELIOS_DECODE_STACK=0; "
                             "labels ending in -per-layer)")
    parser.add_argument("--kv-cache-dtype", nargs="*", default=[],
                        help="also run each helios engine with this KV cache dtype, e.g. float16 (labels ending in "
                             "-kv-float16)")
    parser.add_argument("--gguf-dir", default=str(Path(tempfile.gettempdir()) / "helios-peers-gguf"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helios.model.source import resolve_model

    hf_dir = str(resolve_model("smollm2-135m").path)  # the Q4_1 GGUF dequantized to a float32 HF directory
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts = chat_prompts(tokenizer, max(args.batch_sizes))
    threads = torch.get_num_threads()
    base = {"prompts": prompts, "batches": args.batch_sizes, "max_tokens": args.max_tokens, "threads": threads}
    engines = [
        ("helios-fp32", sys.executable, {"engine": "helios", "model": "smollm2-135m"}),
        ("helios-int8", sys.executable, {"engine": "helios", "model": "smollm2-135m", "quantization": "int8"}),
        ("helios-int4", sys.executable, {"engine": "helios", "model": "smollm2-135m", "quantization": "int4"}),
        ("helios-w8a8", sys.executable, {"engine": "helios", "model": "smollm2-135m", "quantization": "w8a8"}),
        ("helios-w4a8", sys.executable, {"engine": "helios", "model": "smollm2-135m", "quantization": "w4a8"}),
        ("transformers-fp32", sys.executable, {"engine": "transformers", "model": hf_dir}),
    ]
    helios_engines = [e for e in engines if e[0].startswith("helios")]
    if args.per_layer:  # the per-layer decode path the stack replaced, in the same run
        engines += [(f"{label}-per-layer", python, {**job, "env": {"HELIOS_DECODE_STACK": "0"}})
                    for label, python, job in helios_engines]
    for kv_cache_dtype in args.kv_cache_dtype:  # a 16-bit cache under the float32 model: half the attention reads
        engines += [(f"{label}-kv-{kv_cache_dtype}", python, {**job, "kv_cache_dtype": kv_cache_dtype})
                    for label, python, job in helios_engines]
    if args.omp_active:  # helios as README "CPU threads" advises for a machine dedicated to it: spinning threads
        engines += [(f"{label}-active", python, {**job, "env": {"OMP_WAIT_POLICY": "ACTIVE"}})
                    for label, python, job in helios_engines]
    if args.vllm_python:
        engines.append(("vllm-fp32", args.vllm_python, {"engine": "vllm", "model": hf_dir}))
    if args.llamacpp_python:
        gguf_dir = Path(args.gguf_dir)
        gguf_dir.mkdir(parents=True, exist_ok=True)
        source = q4_1_gguf()
        for kind in ("f32", "f16"):
            write_float_gguf(args.llamacpp_python, source, gguf_dir / f"smollm2-135m-{kind}.gguf", kind)
            engines.append((f"llamacpp-{kind}", args.llamacpp_python,
                            {"engine": "llamacpp", "model": str(gguf_dir / f"smollm2-135m-{kind}.gguf")}))
        engines.append(("llamacpp-q4_1", args.llamacpp_python, {"engine": "llamacpp", "model": str(source)}))
    engines = [e for e in engines if e[0] not in args.skip]

    runs: dict[str, list[dict]] = {label: [] for label, _, _ in engines}
    failed: dict[str, str] = {}  # an engine that fails once is reported and left out of the remaining rounds
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = engines[r % len(engines):] + engines[:r % len(engines)]
            for label, python, job in order:
                if label in failed:
                    continue
                print(f"round {r + 1}/{args.rounds}: {label} (load average {load_average():.2f})", flush=True)
                try:
                    result = run_worker(python, {**base, **job, "label": label}, Path(tmp))
                except subprocess.CalledProcessError as error:
                    failed[label] = f"round {r + 1}: worker exited with status {error.returncode}"
                    print(f"{label} failed ({failed[label]}); left out", flush=True)
                    continue
                result["load_average"] = load_average()
                runs[label].append(result)
    if "helios-fp32" not in runs or not runs["helios-fp32"]:
        raise SystemExit("helios-fp32 is the quality reference and did not run")
    runs = {label: results for label, results in runs.items() if results}

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    table: dict[str, dict] = {}
    for label, results in runs.items():
        row = {}
        for b in args.batch_sizes:
            rates = [res["batches"][str(b)]["tokens_per_s"] for res in results]
            got = results[0]["batches"][str(b)]["token_ids"]
            want = runs["helios-fp32"][0]["batches"][str(b)]["token_ids"]
            row[str(b)] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                           "agreement_vs_helios_fp32": greedy_agreement(got, want)}
        biggest = str(max(args.batch_sizes))
        row["perplexity"] = perplexity(reference, prompts, results[0]["batches"][biggest]["token_ids"])
        row["load_average"] = [res["load_average"] for res in results]
        table[label] = row
    fp32_ppl = table["helios-fp32"]["perplexity"]
    print(f"\n{'engine':20s} " + " ".join(f"{'batch ' + str(b):>22s}" for b in args.batch_sizes)
          + "  agreement@32  ppl ratio")
    for label, row in table.items():
        row["perplexity_ratio"] = row["perplexity"] / fp32_ppl
        cells = " ".join(f"{row[str(b)]['median']:8.1f} ({row[str(b)]['min']:.0f}-{row[str(b)]['max']:.0f})"
                         .rjust(22) for b in args.batch_sizes)
        biggest = str(max(args.batch_sizes))
        print(f"{label:20s} {cells}  {row[biggest]['agreement_vs_helios_fp32']:11.3f}  {row['perplexity_ratio']:9.3f}")
    path = save("peers", {"machine": machine(), "max_tokens": args.max_tokens, "rounds": args.rounds, "failed": failed,
                          "prompt_tokens": [len(p) for p in prompts], "table": table,
                          "runs": {label: [{k: v for k, v in res.items() if k != "batches"} |
                                           {"tokens_per_s": {b: x["tokens_per_s"] for b, x in res["batches"].items()}}
                                           for res in results] for label, results in runs.items()}})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
