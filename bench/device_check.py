"""Proves the CUDA path in one command on a GPU machine: builds helios._C with CUDA, runs the test suite (its
cuda cases included), then times the Triton exit head, the paged attention kernel, one engine decode step and
engine throughput against measured ceilings and against their baselines (see bench/device_timings.py).

  python bench/device_check.py --out DIR           on a CUDA machine with a fresh copy of this repository
  python bench/device_check.py --dry-run           anywhere: prints the plan and exits
  python bench/device_check.py --smoke --out DIR   on CPU: every timed section at tiny sizes (no build, no tests)

Writes DIR/device_check.json and DIR/device_check.md (GPU name; torch, triton, CUDA, transformers versions),
DIR/build.log, DIR/pytest.log and DIR/junit.xml, and prints a short table last. A failing section is recorded
and the next one runs. Sections stop being started once --budget-s seconds have passed (default 420).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


class Plan:
    """What each section runs, at full size (a GPU) or at smoke size (CPU)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.exit_head_shapes = {"tiny": (64, 1000)} if smoke else {
            "smollm2-135m": (576, 49152), "llama-3.2-1b": (2048, 128256), "llama-3-8b": (4096, 128256)}
        self.exit_head_batches = [1, 5] if smoke else [1, 16, 64, 256]
        self.attention_layouts = {"tiny": (4, 2, 16)} if smoke else {"llama-3.2-1b": (32, 8, 64),
                                                                      "llama-3-8b": (32, 8, 128)}
        self.attention_batches = [2] if smoke else [16, 64]
        self.attention_contexts = [40] if smoke else [512, 2048]
        self.decode_models = ["tiny"] if smoke else ["smollm2-135m", "llama-3.2-1b", "llama-3-8b"]
        self.decode_batches = [1, 4] if smoke else [1, 16, 64, 256]
        self.decode_prompt, self.decode_steps = (8, 4) if smoke else (128, 24)
        self.throughput_models = ["tiny"] if smoke else ["smollm2-135m", "llama-3.2-1b"]
        self.throughput_batches = [1, 4] if smoke else [1, 8, 32, 128]
        self.throughput_prompt, self.throughput_tokens = (8, 4) if smoke else (64, 64)
        self.copy_bytes, self.gemm_n = (2**22, 128) if smoke else (2**30, 8192)

    def describe(self) -> list[str]:
        kernel_dtype = "float32" if self.smoke else "bfloat16"
        return [
            "build    " + ("skipped (--smoke)" if self.smoke else
                           "HELIOS_BUILD_EXT=cuda pip install --no-deps --no-build-isolation --no-index -e . "
                           "(TORCH_CUDA_ARCH_LIST = this GPU's), then check helios._C.built_with_cuda"),
            "tests    " + ("skipped (--smoke)" if self.smoke else
                           "python -m pytest -q (cuda cases of the device fixture included), junit.xml parsed"),
            f"ceilings device copy of {self.copy_bytes / 2**20:.0f} MiB (read + write bytes), "
            f"{self.gemm_n}^3 {kernel_dtype} GEMM",
            f"exithead Triton exit head vs unfused torch chain vs LM-head read at copy bandwidth; {kernel_dtype}; "
            f"shapes {self.exit_head_shapes}; batches {self.exit_head_batches}",
            f"paged    paged-attention decode vs SDPA over gathered K/V vs K/V read; {kernel_dtype}; layouts "
            f"(heads, kv_heads, head_dim) {self.attention_layouts}; batches {self.attention_batches}; contexts "
            f"{self.attention_contexts}; block 16, scattered blocks",
            f"decode   one engine decode step (load_format='dummy', {kernel_dtype}) vs max(bytes floor, FLOPs floor); "
            f"models {self.decode_models}; batches {self.decode_batches}; prompt {self.decode_prompt} tokens, "
            f"{self.decode_steps} timed steps",
            f"generate helios vs transformers generate, same random-weight model and token prompts, {kernel_dtype}; "
            f"models {self.throughput_models}; batches {self.throughput_batches}; {self.throughput_prompt} prompt + "
            f"{self.throughput_tokens} new tokens; 2 alternating rounds",
        ]


def run_logged(cmd: list[str], log: Path, env: dict, timeout: float) -> tuple[int, float]:
    start = time.time()
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n*** timed out after {timeout:.0f} s\n")
            code = 124
    return code, time.time() - start


def build(out: Path) -> dict:
    import torch

    env = {**os.environ, "HELIOS_BUILD_EXT": "cuda", "MAX_JOBS": str(os.cpu_count() or 4)}
    major, minor = torch.cuda.get_device_capability()
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e",
           str(ROOT)]
    code, seconds = run_logged(cmd, out / "build.log", env, timeout=300)
    probe = subprocess.run([sys.executable, "-c", "import helios._C as c; print(c.built_with_cuda)"], cwd=ROOT,
                           capture_output=True, text=True)
    return {"returncode": code, "seconds": round(seconds, 1), "arch_list": env["TORCH_CUDA_ARCH_LIST"],
            "built_with_cuda": probe.stdout.strip() == "True", "probe_error": probe.stderr[-2000:]}


def run_tests(out: Path, stories260k: Path | None, timeout: float) -> dict:
    env = dict(os.environ)
    if stories260k is not None:
        env["HELIOS_STORIES260K"] = str(stories260k)
    junit = out / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    code, seconds = run_logged(cmd, out / "pytest.log", env, timeout=timeout)
    result = {"returncode": code, "seconds": round(seconds, 1)}
    if junit.is_file():
        result.update(junit_counts(junit))
    lines = (out / "pytest.log").read_text().strip().splitlines()
    result["summary"] = lines[-1] if lines else ""
    return result


def junit_counts(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "cuda_passed": 0, "cuda_failed": 0, "cuda_skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
            failures.append(name)
        elif case.find("skipped") is not None:
            outcome = "skipped"
        counts[outcome] += 1
        if "cuda" in (case.get("name") or ""):
            counts["cuda_" + outcome] += 1
    counts["failures"] = failures[:50]
    return counts


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": platform.node(), "cpus": os.cpu_count()}
    for package in ("triton", "transformers"):  # versions without importing (triton must not load before helios)
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


def timed_sections(plan: Plan, device, tokenizer_dir: Path, work: Path, results: dict, deadline: float) -> None:
    """Runs the timed sections in order; each failure is recorded and the next section still runs."""
    import device_timings as t
    import torch

    dtype = torch.float32 if plan.smoke else torch.bfloat16
    sections = [
        ("ceilings", lambda: t.ceilings(device, plan.copy_bytes, plan.gemm_n, dtype)),
        ("exit_head", lambda: t.exit_head_rows(device, plan.exit_head_shapes, plan.exit_head_batches, dtype,
                                               results["ceilings"]["bandwidth_bytes_s"])),
        ("paged_attention", lambda: t.paged_attention_rows(
            device, plan.attention_layouts, plan.attention_batches, plan.attention_contexts, dtype,
            results["ceilings"]["bandwidth_bytes_s"])),
        ("decode_step", lambda: [row for name in plan.decode_models for row in t.decode_step_rows(
            device, name, t.model_dir(name, work / "dummy", tokenizer_dir), plan.decode_batches, plan.decode_prompt,
            plan.decode_steps, dtype, results["ceilings"]["bandwidth_bytes_s"],
            results["ceilings"]["gemm_flop_s"])]),
        ("throughput", lambda: [row for name in plan.throughput_models for row in t.throughput_rows(
            device, name, work / "saved", tokenizer_dir, plan.throughput_batches, plan.throughput_prompt,
            plan.throughput_tokens, dtype)]),
    ]
    for name, run in sections:
        if time.time() > deadline:
            results["errors"][name] = "not started: the time budget was spent"
            continue
        start = time.time()
        print(f"[device_check] {name} ...", flush=True)
        try:
            results[name] = run()
        except Exception:  # noqa: BLE001 - a broken section must not cost the others
            results["errors"][name] = traceback.format_exc()[-4000:]
            print(results["errors"][name], file=sys.stderr, flush=True)
        results["seconds"][name] = round(time.time() - start, 1)
        t.free_device_memory(device)


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [f"# device_check: {env.get('gpu', 'CPU (smoke)')}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), triton {env.get('triton')}, transformers "
             f"{env.get('transformers')}, Python {env['python']}, driver {env.get('driver')}, {env['cpus']} CPUs", ""]
    build, tests = results.get("build"), results.get("tests")
    if build:
        lines.append(f"- build: returncode {build['returncode']}, built_with_cuda {build['built_with_cuda']}, "
                     f"{build['seconds']} s")
    if tests:
        lines.append(f"- tests: {tests.get('passed')} passed, {tests.get('failed')} failed, {tests.get('skipped')} "
                     f"skipped; cuda cases {tests.get('cuda_passed')} passed, {tests.get('cuda_failed')} failed, "
                     f"{tests.get('cuda_skipped')} skipped ({tests['seconds']} s)")
        lines += [f"  - FAILED {name}" for name in tests.get("failures", [])]
    if "ceilings" in results:
        c = results["ceilings"]
        lines.append(f"- ceilings: copy {c['bandwidth_bytes_s'] / 1e12:.2f} TB/s (read + write), {c['gemm_dtype']} "
                     f"GEMM {c['gemm_flop_s'] / 1e12:.1f} TFLOP/s")
    lines.append("")
    tables = {
        "exit_head": ("Exit head (Triton) vs unfused chain vs reading the LM head once",
                      ["shape", "batch", "fused_ms", "floor_ms", "fused_over_floor", "unfused_ms",
                       "speedup_vs_unfused", "token_agreement"]),
        "paged_attention": ("Paged attention decode vs SDPA over gathered K/V vs reading the K/V once",
                            ["layout", "batch", "context", "paged_ms", "sdpa_ms", "floor_ms", "paged_over_floor",
                             "max_abs_diff"]),
        "decode_step": ("One engine decode step vs its floor (dummy weights)",
                        ["model", "batch", "step_ms", "bytes_floor_ms", "flops_floor_ms", "step_over_floor",
                         "tokens_per_s"]),
        "throughput": ("Engine vs transformers generate (same random-weight model and prompts)",
                       ["model", "batch", "transformers_tok_s", "helios_tok_s", "speedup", "greedy_agreement"]),
    }
    for key, (title, columns) in tables.items():
        if not results.get(key):
            continue
        lines += [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in results[key]:
            lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
        lines.append("")
    for name, error in results["errors"].items():
        lines += [f"## {name} failed", "", "```", error.strip(), "```", ""]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def short_table(results: dict) -> str:
    """The last lines printed: what a caller reads first."""
    out = [markdown(results).split("\n## ")[0].strip()]
    for key, cols in (("exit_head", ("shape", "batch", "fused_over_floor", "speedup_vs_unfused")),
                      ("paged_attention", ("layout", "batch", "context", "paged_over_floor", "sdpa_over_paged")),
                      ("decode_step", ("model", "batch", "step_ms", "step_over_floor")),
                      ("throughput", ("model", "batch", "speedup", "greedy_agreement"))):
        for row in results.get(key) or []:
            out.append(f"{key:<15} " + "  ".join(f"{c}={_cell(row[c])}" for c in cols))
    if results["errors"]:
        out.append("errors in: " + ", ".join(results["errors"]))
    return "\n".join(out)


def default_stories260k() -> Path | None:
    from common import SHARED

    for candidate in (os.environ.get("HELIOS_STORIES260K"), SHARED / "models" / "stories260k",
                      ROOT / ".device" / "stories260k"):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, help="folder for the results (required unless --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--smoke", action="store_true", help="CPU: the timed sections at tiny sizes; no build/tests")
    parser.add_argument("--skip-build", action="store_true", help="use the helios._C already built")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--stories260k", type=Path, default=None,
                        help="stories260k checkpoint for the tests and as the tokenizer of the shaped models "
                             "(default: $HELIOS_STORIES260K, $HELIOS_SHARED/models/stories260k, .device/stories260k)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: stories260k's)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
    parser.add_argument("--test-timeout-s", type=float, default=240.0)
    args = parser.parse_args(argv)
    plan = Plan(args.smoke)
    if args.dry_run:
        print("device_check plan" + (" (smoke, CPU)" if args.smoke else " (CUDA)") + ":")
        for line in plan.describe():
            print("  " + line)
        print(f"  output   {args.out or 'DIR'}/device_check.json, device_check.md, build.log, pytest.log, junit.xml")
        print(f"  budget   no section starts after {args.budget_s:.0f} s")
        return 0
    if args.out is None:
        parser.error("--out DIR is required (or --dry-run)")
    if args.smoke:  # CPU tensors only, also on a GPU machine: the Triton kernel must be interpreted
        os.environ["TRITON_INTERPRET"] = "1"
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    stories = args.stories260k or default_stories260k()
    tokenizer_dir = args.tokenizer or stories
    if tokenizer_dir is None:
        parser.error("no tokenizer: pass --tokenizer DIR or --stories260k DIR (the models with real shapes borrow it)")

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: run with --smoke on CPU, or --dry-run")
    results: dict = {"benchmark": "device_check", "smoke": args.smoke, "env": environment(), "plan": plan.describe(),
                     "errors": {}, "seconds": {}}
    if not args.smoke and not args.skip_build:
        print("[device_check] build ...", flush=True)
        results["build"] = build(args.out)
        if not results["build"]["built_with_cuda"]:
            results["errors"]["build"] = (args.out / "build.log").read_text()[-4000:] + results["build"]["probe_error"]
    if not args.smoke and not args.skip_tests:
        print("[device_check] tests ...", flush=True)
        results["tests"] = run_tests(args.out, stories, args.test_timeout_s)
    device = torch.device("cuda" if cuda and not args.smoke else "cpu")
    work = args.out / "models" if args.smoke else Path("/tmp/helios_device_check")
    timed_sections(plan, device, tokenizer_dir, work, results, deadline=start + args.budget_s)
    results["seconds"]["total"] = round(time.time() - start, 1)
    (args.out / "device_check.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "device_check.md").write_text(markdown(results))
    print(short_table(results), flush=True)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
