"""helios command line: `helios generate` streams a completion (or writes a file of prompts' completions as JSON
lines), `helios info` describes a model, `helios tune-exits` trains exit adapters, `helios calibrate` picks their
thresholds, `helios profile` profiles candidate models and prints the Performance History Table, `helios serve` runs
the OpenAI-compatible server. A bare `helios` prints this help; Ctrl-C stops cleanly (exit status 130)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from helios import __version__ as helios_version
from helios.model.source import DEFAULT_MODEL
from helios.utils.memory import format_bytes


def _add_engine_args(parser: argparse.ArgumentParser, several_models: bool = False) -> None:
    if several_models:
        parser.add_argument("--model", action="append", default=None,
                            help=f"HF directory, .gguf file or alias (default: {DEFAULT_MODEL}); repeat it for "
                                 "candidates the control plane chooses between")
    else:
        parser.add_argument("--model", default=DEFAULT_MODEL,
                            help=f"HF directory, .gguf file or alias (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--num-layers", type=int, default=None, help="load only decoder layers 1..N")
    parser.add_argument("--memory-budget", default=None, help="bytes or e.g. 2GiB for weights + activations + KV")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--quantization", default=None, help="int8, int4, w8a8 or w4a8 (CPU; default: none)")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="auto (the model's dtype), or float16 / bfloat16 under a float32 model (CPU)")


def _engine_kwargs(args) -> dict:
    return dict(model=args.model, device=args.device, dtype=args.dtype, num_layers=args.num_layers,
                memory_budget=args.memory_budget, max_model_len=args.max_model_len,
                quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)


PROMPT_FIELDS = ("prompt", "text", "question", "document")  # the first present is the prompt (gsm8k: question)


def _read_prompts(path: str) -> list[str]:
    """One prompt per line of a text file (blank lines skipped), or per record of a .jsonl file (a string, or an
    object with a "prompt" field, else "text", "question" or "document")."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise FileNotFoundError(f"cannot read --prompts-file {path}: {e}") from e
    if not path.endswith(".jsonl"):
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        record = json.loads(line)
        prompt = next((record[k] for k in PROMPT_FIELDS if isinstance(record.get(k), str)), None) \
            if isinstance(record, dict) else record
        if not isinstance(prompt, str):
            raise ValueError(f"{path} line {number}: expected a string or an object with a string field among "
                             f"{PROMPT_FIELDS}")
        prompts.append(prompt)
    return prompts


def _exit_config(args):
    from helios import ExitConfig

    if not (args.early_exit or args.heads):
        return None
    return ExitConfig(threshold=args.exit_threshold, heads=args.heads)


def _exit_summary(llm) -> str:
    stats = llm.stats()
    histogram, depth = stats["exit_histogram"], stats["loaded_layers"]
    total = sum(histogram.values())
    early = sum(count for layer, count in histogram.items() if layer < depth)
    return (f"early exit: {early}/{total} tokens left before layer {depth} ({early / max(1, total):.0%}); "
            f"exit layers {histogram}; confidence breaches {stats['num_breaches']}")


def cmd_generate(args) -> int:
    from helios import LLM, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop or None)
    prompts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts_file)
    llm = LLM(**_engine_kwargs(args), max_num_seqs=1 if args.prompt is not None else 256,
              early_exit=_exit_config(args))
    if args.chat:
        prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    if args.prompts_file is not None:  # a batch: one JSON line per prompt, in order
        for source, out in zip(prompts, llm.generate(prompts, params, use_tqdm=sys.stderr.isatty()), strict=True):
            completion = out.outputs[0]
            record = {"prompt": source["prompt"] if isinstance(source, dict) else source, "text": completion.text,
                      "finish_reason": completion.finish_reason, "tokens": len(completion.token_ids)}
            print(json.dumps(record, ensure_ascii=False), flush=True)
    else:
        if args.echo:
            sys.stdout.write(args.prompt)
        for piece in llm.stream(prompts[0], params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if llm.stats()["early_exit"] is not None:
        print(_exit_summary(llm), file=sys.stderr)
    return 0


def _head_description(stats: dict) -> str:
    tied, head = stats["lm_head_tied"], stats["lm_head_bytes"]
    copy = stats["weight_bytes"] - stats["layer_bytes"] - stats["embedding_bytes"] - (0 if tied else head)
    notes = (["tied to the embedding"] if tied else []) + (
        [f"+ {format_bytes(copy)} packed copy for fast matmuls"] if copy > 0 else [])
    return format_bytes(head) + (f" ({'; '.join(notes)})" if notes else "")


def cmd_info(args) -> int:
    from helios import LLM

    llm = LLM(**_engine_kwargs(args), kv_cache_blocks=args.kv_cache_blocks)
    stats = llm.stats()
    params = llm.engine.model.num_parameters
    if args.json:
        print(json.dumps({**stats, "loaded_parameters": params}, indent=2))
        return 0
    rows = [
        ("model", stats["model"]), ("path", stats["model_path"]), ("architecture", stats["architecture"]),
        ("layers", f"{stats['loaded_layers']} loaded of {stats['total_layers']}"),
        ("parameters (loaded)", f"{params / 1e6:.1f} M"), ("dtype / device", f"{stats['dtype']} / {stats['device']}"),
        ("weights", format_bytes(stats["weight_bytes"])),
        ("  decoder layers", format_bytes(stats["layer_bytes"])),
        ("  embedding", format_bytes(stats["embedding_bytes"])),
        ("  LM head", _head_description(stats)),
        ("KV bytes per token", f"{stats['kv_bytes_per_token']:,} ({stats['kv_cache_dtype']})"),
        ("KV pool", f"{format_bytes(stats['kv_cache_bytes'])} = {stats['kv_blocks_total']:,} blocks "
                    f"x {stats['block_size']} tokens"),
        ("max model len", f"{stats['max_model_len']:,}"),
        ("max concurrent seqs", f"{stats['max_concurrent_seqs']} at max model len"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _layer_list(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        message = f"expected comma-separated layer numbers such as 10,20,24, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not layers:
        raise argparse.ArgumentTypeError("expected at least one layer number")
    return layers


def _print_table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def cmd_tune_exits(args) -> int:
    from helios.tuning.tune import tune_exits

    options = dict(max_tokens=args.max_tokens, eval_tokens=args.eval_tokens, seq_len=args.seq_len,
                   batch_tokens=args.batch_tokens, epochs=args.epochs, lr=args.lr, ce_weight=args.ce_weight,
                   sample_fraction=args.sample_fraction, train_norm=args.train_norm, seed=args.seed,
                   distill=args.distill, top_k=args.top_k, tail_samples=args.tail_samples)
    heads = tune_exits(args.model, args.corpus, args.layers, args.out, eval_corpus=args.eval_corpus,
                       **{k: v for k, v in options.items() if v is not None})
    held = heads.info["held_out"]
    print(f"trained on {heads.info['training']['tokens']:,} tokens in {heads.info['training']['seconds']:.0f} s; "
          f"held-out top-1 agreement with the final layer ({held['tokens']:,} tokens):")
    _print_table(["exit layer", "before", "after", "KL before", "KL after"],
                 [[layer, r["agreement_before"], r["agreement_after"], r["kl_before"], r["kl_after"]]
                  for layer, r in held["per_exit"].items()])
    print(f"saved to {args.out}; next: helios calibrate --model {args.model} --heads {args.out} --corpus HELD_OUT")
    return 0


def cmd_calibrate(args) -> int:
    from helios.tuning.calibration import calibrate_exits

    report = calibrate_exits(args.model, args.heads, args.corpus, args.target_precision,
                             confidence=args.confidence, max_tokens=args.max_tokens, min_exits=args.min_exits,
                             seed=args.seed)
    print(f"{report['tokens']:,} held-out tokens, target precision {args.target_precision}:")
    _print_table(["exit layer", "threshold", "exit rate", "precision"],
                 [[layer, r["threshold"], r["exit_rate"], r["precision"]] for layer, r in report["per_exit"].items()])
    print(f"early exits: {report['early_exit_rate']:.1%} of tokens, precision {report['early_exit_precision']}; "
          f"thresholds written to {args.heads}")
    return 0


def cmd_profile(args) -> int:
    from helios import LLM, SamplingParams
    from helios.control import SLO

    prompts = _read_prompts(args.corpus)
    needed = args.requests * len(args.model)
    if len(prompts) < needed:
        raise ValueError(f"--corpus {args.corpus} has {len(prompts)} prompts; profiling {len(args.model)} models on "
                         f"{args.requests} requests each needs {needed}")
    slo = SLO(objective=args.objective, profile_requests=args.requests, reprofile_interval=10**9,
              target_precision=args.target_precision)
    llm = LLM(args.model, slo=slo, memory_budget=args.memory_budget, max_model_len=args.max_model_len,
              device=args.device, dtype=args.dtype, repository=args.repository)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for k in range(len(args.model)):  # one profile's requests at a time: the candidates are profiled in turn
        llm.generate(prompts[k * args.requests:(k + 1) * args.requests], params, use_tqdm=True)
    control = llm.stats()["control"]
    print(f"Performance History Table ({args.requests} requests per model, {args.max_tokens} new tokens each):")
    _print_table(["model", "tokens", "tok/s", "ms/layer", "ms/check", "prompt bits/byte", "output bits/byte",
                  "agreement with the last layer by probe layer"],
                 [[row["model"], row["tokens"], row["tokens_per_second"], round(1e3 * row["seconds_per_layer"], 3),
                   round(1e3 * row["seconds_per_check"], 3), _round(row["prompt_bpb"]), _round(row["output_bpb"]),
                   " ".join(f"{k}:{v}" for k, v in row["agreement"].items())] for row in control["pht"]])
    print(f"selected for {args.objective}: {control['active_model']} at depth {control['depth']}, exits "
          f"{control['exits']}, thresholds {control['thresholds']}")
    return 0


def cmd_serve(args) -> int:
    try:
        from helios.server.launch import serve
    except ImportError as e:
        raise ImportError(f"helios serve needs the server extra: pip install 'helios-serve[server]' ({e})") from e

    kwargs = _engine_kwargs(args)
    models = kwargs.pop("model") or [DEFAULT_MODEL]
    if args.slo is not None:
        kwargs["slo"] = args.slo
    return serve(models, host=args.host, port=args.port, served_model_names=args.served_model_name,
                 shutdown_timeout=args.shutdown_timeout, log_level=args.log_level, max_num_seqs=args.max_num_seqs,
                 kv_cache_blocks=args.kv_cache_blocks, **kwargs)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helios", description="helios-serve: early-exit LLM serving runtime")
    version = f"helios-serve {helios_version}"
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("generate", help="generate text for a prompt (streamed) or a file of prompts (JSON lines)")
    _add_engine_args(gen)
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt; its completion is streamed to the terminal")
    what.add_argument("--prompts-file", help="one prompt per line (.jsonl: a string or {\"prompt\": ...} per line); "
                                             "prints one JSON line per completion")
    gen.add_argument("--version", action="version", version=version)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    gen.add_argument("--early-exit", action="store_true",
                     help="let tokens leave the layer stack at confident exits (ExitConfig defaults)")
    gen.add_argument("--heads", default=None,
                     help="tuned exit heads (a tune-exits directory); implies --early-exit, calibrated thresholds")
    gen.add_argument("--exit-threshold", type=float, default=None,
                     help="confidence threshold of every exit (default: the heads' calibrated ones, else 0.9)")
    gen.set_defaults(func=cmd_generate)
    info = sub.add_parser("info", help="print layers, parameters and memory of a model")
    _add_engine_args(info)
    info.add_argument("--kv-cache-blocks", type=int, default=None)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    tune = sub.add_parser("tune-exits", help="train exit adapters by self-distillation on unlabeled text")
    tune.add_argument("--model", default=DEFAULT_MODEL)
    tune.add_argument("--corpus", nargs="+", required=True, help="training text: .txt, .jsonl or .json files")
    tune.add_argument("--layers", type=_layer_list, required=True, help="exit layers, e.g. 10,20,24")
    tune.add_argument("--out", required=True, help="directory for exit_heads.safetensors + manifest.json")
    tune.add_argument("--eval-corpus", nargs="+", default=None,
                      help="held-out text (default: every 10th window of --corpus, never trained on)")
    tune.add_argument("--max-tokens", type=int, default=200_000, help="training tokens (default 200000)")
    tune.add_argument("--eval-tokens", type=int, default=10_000)
    tune.add_argument("--sample-fraction", type=float, default=None,
                      help="share of the training positions kept for the loss, at random (default 0.7)")
    tune.add_argument("--seq-len", type=int, default=256)
    tune.add_argument("--batch-tokens", type=int, default=None,
                      help="sampled positions per optimizer step (default 256)")
    tune.add_argument("--epochs", type=int, default=1,
                      help="passes over the sampled positions (the frozen model runs once either way)")
    tune.add_argument("--lr", type=float, default=None,
                      help="Adam learning rate (default 1e-2, warmup then cosine to a tenth)")
    tune.add_argument("--ce-weight", type=float, default=None,
                      help="weight of top-1 cross-entropy next to KL (default 3; 0 = KL only)")
    tune.add_argument("--no-train-norm", dest="train_norm", action="store_false", default=None,
                      help="keep the final norm's weights at every exit (default: learn one per exit)")
    tune.add_argument("--distill", choices=["auto", "full", "candidates"], default=None,
                      help="KL over the whole vocabulary (full) or over each batch's teacher top-k tokens plus a "
                           "sampled tail (candidates); auto (default): candidates above 100k tokens of vocabulary")
    tune.add_argument("--top-k", type=int, default=None, help="candidates: teacher tokens per position (default 32)")
    tune.add_argument("--tail-samples", type=int, default=None,
                      help="candidates: uniform samples per step estimating the student's tail (default 2048)")
    tune.add_argument("--seed", type=int, default=0)
    tune.set_defaults(func=cmd_tune_exits)

    cal = sub.add_parser("calibrate", help="choose per-exit thresholds for a target precision on held-out text")
    cal.add_argument("--model", default=DEFAULT_MODEL)
    cal.add_argument("--heads", required=True, help="directory written by tune-exits")
    cal.add_argument("--corpus", nargs="+", required=True, help="held-out text not used in training")
    cal.add_argument("--target-precision", type=float, default=0.95,
                     help="share of exiting tokens that must agree with the final layer (default 0.95)")
    cal.add_argument("--confidence", default="max_prob", choices=["max_prob", "margin", "entropy"])
    cal.add_argument("--max-tokens", type=int, default=50_000)
    cal.add_argument("--min-exits", type=int, default=50,
                     help="an exit must let at least this many calibration tokens out, else it is switched off")
    cal.add_argument("--seed", type=int, default=0)
    cal.set_defaults(func=cmd_calibrate)

    prof = sub.add_parser("profile", help="profile candidate models on a corpus of prompts and print the PHT")
    prof.add_argument("--model", action="append", required=True, help="a candidate (repeat for each)")
    prof.add_argument("--corpus", required=True,
                      help="prompts: one per line, or per record of a .jsonl file (a string or {\"prompt\": ...})")
    prof.add_argument("--requests", type=int, default=5, help="prompts each candidate serves (default 5)")
    prof.add_argument("--max-tokens", type=int, default=32)
    prof.add_argument("--objective", default="throughput", choices=["throughput", "latency", "energy", "memory"])
    prof.add_argument("--target-precision", type=float, default=0.9)
    prof.add_argument("--repository", default=None, help="JSON file keeping facts and profiles across runs")
    prof.add_argument("--memory-budget", default=None)
    prof.add_argument("--max-model-len", type=int, default=None)
    prof.add_argument("--device", default="auto")
    prof.add_argument("--dtype", default="auto")
    prof.set_defaults(func=cmd_profile)

    srv = sub.add_parser("serve", help="serve the OpenAI API (/v1/completions, /v1/chat/completions) over HTTP")
    _add_engine_args(srv, several_models=True)
    srv.add_argument("--slo", default=None, choices=["throughput", "latency", "energy", "memory"],
                     help="run the control plane for this objective (default with several --model: throughput)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", action="append", default=None,
                     help="the name(s) clients use for the model (default: the --model value; with several: "
                          "helios and each candidate)")
    srv.add_argument("--max-num-seqs", type=int, default=256)
    srv.add_argument("--kv-cache-blocks", type=int, default=None)
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds in-flight requests may finish after SIGINT/SIGTERM before they are aborted")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `helios`
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"helios: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: streams and batches abort their requests on the way out
        print("\nhelios: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
