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
    # fp32 parameters; on CPU helios._C reads the LM head in place, so no prepared copy of it (300 x 48) is held
    import torch

    from helios.ops.linear import onednn_linear_supported, plain_linear_supported

    plain = plain_linear_supported(torch.zeros(1, 1))
    head_copy = 4 * 300 * 48 if onednn_linear_supported(torch.float32) and not plain else 0
    assert head_copy == 0  # the extension is built for the tests
    assert info["loaded_parameters"] > 0 and info["weight_bytes"] == 4 * info["loaded_parameters"] + head_copy
    assert main(["info", "--model", str(checkpoints["llama"]), "--num-layers", "2", "--kv-cache-blocks", "10"]) == 0
    assert "2 loaded of 4" in capsys.readouterr().out
    assert main(["info", "--model", str(checkpoints["llama"]), "--num-layers", "2", "--kv-cache-blocks", "10",
                 "--kv-cache-dtype", "float16", "--quantization", "int8", "--json"]) == 0
    narrow = json.loads(capsys.readouterr().out)
    assert narrow["kv_cache_dtype"] == "float16" and 2 * narrow["kv_bytes_per_token"] == info["kv_bytes_per_token"]
    assert narrow["weight_bytes"] < info["weight_bytes"]  # int8 decoder linears


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_bare_helios_prints_help_and_version(capsys):
    import pytest

    from helios import __version__

    assert main([]) == 0
    assert "generate" in capsys.readouterr().out
    for argv in (["--version"], ["generate", "--version"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0 and capsys.readouterr().out.strip() == f"helios-serve {__version__}"


def test_prompts_file_prints_one_json_line_per_prompt(checkpoints, tmp_path, capsys):
    path = checkpoints["llama"]
    text_file, jsonl_file = tmp_path / "prompts.txt", tmp_path / "prompts.jsonl"
    text_file.write_text("\n".join(PROMPTS[:3]) + "\n\n")
    jsonl_file.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[:3]))
    want = [o.outputs[0].text for o in LLM(path, kv_cache_blocks=64).generate(
        PROMPTS[:3], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)]
    for file in (text_file, jsonl_file):
        assert main(["generate", "--model", str(path), "--prompts-file", str(file), "--max-tokens", "6"]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        assert [r["prompt"] for r in records] == PROMPTS[:3] and [r["text"] for r in records] == want


def test_generate_with_early_exit_reports_exits(peaked_checkpoints, capsys):
    path = str(peaked_checkpoints["llama"])
    assert main(["generate", "--model", path, "--prompt", PROMPTS[0], "--max-tokens", "8", "--early-exit",
                 "--exit-threshold", "0.5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "early exit:" in captured.err and "exit layers" in captured.err


def test_ctrl_c_exits_cleanly(checkpoints, capsys, monkeypatch):
    def interrupted(self, prompt, params=None):
        yield "partial"
        raise KeyboardInterrupt

    monkeypatch.setattr(LLM, "stream", interrupted)
    assert main(["generate", "--model", str(checkpoints["llama"]), "--prompt", "hi"]) == 130
    captured = capsys.readouterr()
    assert "interrupted" in captured.err and "Traceback" not in captured.err


def test_chat_flag_on_a_model_without_template_is_a_clear_error(checkpoints, capsys):
    assert main(["generate", "--model", str(checkpoints["llama"]), "--prompt", "hi", "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_info_splits_weights_into_layers_embedding_and_head(checkpoints, capsys):
    for kind, tied in (("llama", False), ("llama_tied", True)):
        assert main(["info", "--model", str(checkpoints[kind]), "--kv-cache-blocks", "10", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        embed = 4 * 300 * 48
        assert info["embedding_bytes"] == info["lm_head_bytes"] == embed and info["lm_head_tied"] is tied
        # helios._C reads the head in place on CPU: no prepared copy of it
        assert info["weight_bytes"] == info["layer_bytes"] + embed + (0 if tied else embed)
        assert 0 < info["layer_bytes"] < info["weight_bytes"]


def test_profile_prints_the_pht(checkpoints, tmp_path, capsys):
    corpus = tmp_path / "prompts.jsonl"
    corpus.write_text("\n".join(json.dumps({"question": p}) for p in PROMPTS))
    repo = tmp_path / "repo.json"
    argv = ["profile", "--model", str(checkpoints["llama"]), "--model", str(checkpoints["qwen2"]), "--corpus",
            str(corpus), "--requests", "2", "--max-tokens", "4", "--repository", str(repo)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Performance History Table" in out and str(checkpoints["qwen2"]) in out and "selected for throughput" in out
    assert json.loads(repo.read_text())["candidates"].keys() == {str(checkpoints["llama"]), str(checkpoints["qwen2"])}
    assert main(["profile", "--model", str(checkpoints["llama"]), "--corpus", str(corpus), "--requests", "99"]) == 2
    assert "needs 99" in capsys.readouterr().err
