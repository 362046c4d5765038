"""bench/device_check.py, the one-command CUDA check, on CPU: its plan (--dry-run) and every timed section at tiny
sizes (--smoke), so what a GPU session runs is exercised in CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "device_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_dry_run_prints_the_plan_and_exits_0():
    result = run("--dry-run")
    assert result.returncode == 0, result.stderr
    for section in ("build", "tests", "ceilings", "exithead", "paged", "decode", "generate", "llama-3-8b"):
        assert section in result.stdout
    assert "HELIOS_BUILD_EXT=cuda" in result.stdout


def test_smoke_runs_every_timed_section_on_cpu(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    make_tokenizer().save_pretrained(tokenizer)
    result = run("--smoke", "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert report["errors"] == {}
    assert report["ceilings"]["bandwidth_bytes_s"] > 0 and report["ceilings"]["gemm_flop_s"] > 0
    assert [r["batch"] for r in report["exit_head"]] == [1, 5]
    assert all(r["token_agreement"] == 1.0 and r["max_p1_diff"] < 1e-4 for r in report["exit_head"])
    assert all(r["max_abs_diff"] < 1e-4 for r in report["paged_attention"])
    assert all(r["step_over_floor"] > 1 and r["decode_steps_timed"] >= 3 for r in report["decode_step"])
    assert [r["batch"] for r in report["throughput"]] == [1, 4]
    assert all(r["greedy_agreement"] == 1.0 and r["speedup"] > 0 for r in report["throughput"])
    table = (tmp_path / "out" / "device_check.md").read_text()
    assert "## One engine decode step vs its floor" in table
    assert result.stdout.strip().splitlines()[-1].startswith("throughput")  # the short table comes last
