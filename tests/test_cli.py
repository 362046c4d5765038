"""The helios command line on a tiny checkpoint."""

from __future__ import annotations

import json

from helios import LLM, SamplingParams
from helios.cli import main
from tests.conftest import PROMPTS


def test_generate_streams_the_greedy_completion(checkpoints, capsys):
    path = checkpoints["llama"]
    assert main(["generate", "--model", str(path), "--prompt", PROMPTS[0], "--max-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    want = LLM(path, kv_cache_blocks=16).generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8),
                                                   use_tqdm=False)[0].outputs[0].text
    assert printed == want + "\n"


def test_info_reports_layers_and_memory(checkpoints, capsys):
    assert main(["info", "--model", str(checkpoints["llama"]), "--num-layers", "2", "--kv-cache-blocks", "10",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["loaded_layers"] == 2 and info["total_layers"] == 4 and info["kv_blocks_total"] == 10
    # fp32 parameters, plus a packed copy of the LM head (300 x 48) when oneDNN is used
    from helios.ops.linear import onednn_linear_supported

    head_copy = 4 * 300 * 48 if onednn_linear_supported(__import__("torch").float32) else 0
    assert info["loaded_parameters"] > 0 and info["weight_bytes"] == 4 * info["loaded_parameters"] + head_copy
    assert main(["info", "--model", str(checkpoints["llama"]), "--num-layers", "2", "--kv-cache-blocks", "10"]) == 0
    assert "2 loaded of 4" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
