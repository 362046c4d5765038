"""helios command line: `helios generate` streams a completion, `helios info` describes a model."""

from __future__ import annotations

import argparse
import json
import sys

from helios.model.source import DEFAULT_MODEL
from helios.utils.memory import format_bytes


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"HF directory, .gguf file or alias (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--num-layers", type=int, default=None, help="load only decoder layers 1..N")
    parser.add_argument("--memory-budget", default=None, help="bytes or e.g. 2GiB for weights + activations + KV")
    parser.add_argument("--max-model-len", type=int, default=None)


def _engine_kwargs(args) -> dict:
    return dict(model=args.model, device=args.device, dtype=args.dtype, num_layers=args.num_layers,
                memory_budget=args.memory_budget, max_model_len=args.max_model_len)


def cmd_generate(args) -> int:
    from helios import LLM, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop or None)
    llm = LLM(**_engine_kwargs(args), max_num_seqs=1)
    prompt = args.prompt
    if args.chat:
        prompt = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True)
    if args.echo:
        sys.stdout.write(args.prompt)
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


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
        ("KV bytes per token", f"{stats['kv_bytes_per_token']:,}"),
        ("KV pool", f"{format_bytes(stats['kv_cache_bytes'])} = {stats['kv_blocks_total']:,} blocks "
                    f"x {stats['block_size']} tokens"),
        ("max model len", f"{stats['max_model_len']:,}"),
        ("max concurrent seqs", f"{stats['max_concurrent_seqs']} at max model len"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helios", description="helios-serve: early-exit LLM serving runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    _add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    gen.set_defaults(func=cmd_generate)
    info = sub.add_parser("info", help="print layers, parameters and memory of a model")
    _add_engine_args(info)
    info.add_argument("--kv-cache-blocks", type=int, default=None)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"helios: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
