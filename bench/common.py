"""Helpers shared by the benchmarks: prompts from the data folder $HELIOS_SHARED (default: ../shared beside the
repository; see the README's "Data and models"), machine description, result files."""

from __future__ import annotations

import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("HELIOS_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "bench" / "results"


def gsm8k_questions(n: int, split: str = "test") -> list[str]:
    path = SHARED / "data" / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: set HELIOS_SHARED to the folder holding data/gsm8k")
    with path.open() as f:
        return [json.loads(line)["question"] for line in itertools.islice(f, n)]


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = "cuda-" + torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    path = RESULTS / f"{name}-{device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def greedy_agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Fraction of positions where two greedy continuations agree, up to each pair's first divergence."""
    same = total = 0
    for x, y in zip(got, want, strict=True):
        for s, t in zip(x, y, strict=False):
            if s != t:
                break
            same += 1
        total += len(x)
    return same / total
