"""GGUF → safetensors conversion, cached under ~/.cache/helios (override: HELIOS_CACHE).

transformers (with the gguf package) parses and dequantizes; helios only writes the result as an
ordinary HF directory, so the second load reads safetensors lazily like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch


def cache_root() -> Path:
    return Path(os.environ.get("HELIOS_CACHE") or Path.home() / ".cache" / "helios")


CONVERSION_VERSION = 2  # part of the cache key: entries written by an older conversion are converted again


def _cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    identity = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERSION_VERSION}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key}"


def _chat_template(gguf_path: Path) -> str | None:
    """The chat template of the tokenizer files beside a GGUF, else the one in its metadata. transformers drops it
    when it reads a GGUF's tokenizer from a folder that also holds tokenizer files."""
    import gguf
    from transformers import AutoTokenizer

    try:
        template = AutoTokenizer.from_pretrained(gguf_path.parent).chat_template
    except (OSError, ValueError, TypeError, KeyError):
        template = None
    if template:
        return template
    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")  # parses the whole header: slow
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None and field.data else None


def is_converted(gguf_path: Path) -> bool:
    """Whether this GGUF file (same path, size and time) already has its converted cache entry."""
    if not Path(gguf_path).is_file():
        return False
    target = _cache_dir(Path(gguf_path))
    return (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def convert_gguf(gguf_path: Path) -> Path:
    """Returns an HF directory (config, tokenizer, model.safetensors) holding the dequantized GGUF model."""
    gguf_path = Path(gguf_path)
    target = _cache_dir(gguf_path)
    if is_converted(gguf_path):
        return target
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError("loading .gguf files needs the gguf package: `pip install gguf`") from e
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    print(f"helios: converting {gguf_path.name} to safetensors in {target} (first load only)", flush=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        with torch.device("meta"):  # only for the GGUF → HF tensor-name mapping; allocates nothing
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = _chat_template(gguf_path)
    except (ValueError, KeyError, OSError, EOFError, IndexError) as e:
        raise ValueError(f"cannot read GGUF file {gguf_path}: {e}") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / "model.safetensors"),
                  metadata={"format": "pt", "source": name})
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a crash never leaves a half-written cache entry behind
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
