"""Lazy by-name reader of Hugging Face safetensors checkpoints (single file or sharded), and its stand-in with
random weights (load_format="dummy", as in vLLM) for timing real model shapes without their files.

Only the tensors asked for are read, so loading layers 1..N never touches the bytes of deeper layers.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class NamedTensors:
    """Lookup by tensor name; subclasses fill `_index` (name -> where or what the tensor is)."""

    _index: dict

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        return list(self._index)

    def find(self, *candidates: str) -> str | None:
        """First of the candidate names present (checkpoints differ in their 'model.' prefixes)."""
        return next((name for name in candidates if name in self._index), None)


class Checkpoint(NamedTensors):
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index} is not a valid safetensors index ({e})") from e
            files = sorted({self.directory / f for f in weight_map.values()})
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors weights in {self.directory} (helios reads safetensors or .gguf checkpoints)"
            )
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint shard {path} listed in the index is missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ValueError(f"checkpoint file {path} is truncated or corrupt: {e}") from e
            self._handles[path] = handle
            for name in handle.keys():
                self._file_of[name] = path
        self._index = self._file_of

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        path = self._file_of.get(name)
        if path is None:
            raise ValueError(f"checkpoint {self.directory} has no tensor {name!r} "
                             "(truncated, or another architecture?)")
        try:
            tensor = self._handles[path].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"cannot read {name!r} from {path}: the file is truncated or corrupt ({e})") from e
        return tensor.to(device=device, dtype=dtype)

    def dtype_of(self, name: str) -> torch.dtype | None:
        """Stored dtype of a tensor (None when absent or not a float type helios serves)."""
        path = self._file_of.get(name)
        if path is None:
            return None
        return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(
            self._handles[path].get_slice(name).get_dtype())


class RandomCheckpoint(NamedTensors):
    """The tensor names and shapes transformers gives `config`, filled with seeded random values on request:
    N(0, initializer_range) for weights and biases, ones for norm weights. Speed does not depend on weight values,
    so this times a model's real shapes (an 8B model needs no 16 GB of files); its outputs are meaningless."""

    def __init__(self, config, directory: Path, seed: int = 0):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # names and shapes only; allocates nothing
            skeleton = AutoModelForCausalLM.from_config(config)
        self.directory = Path(directory)
        self.shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
        self._index = self.shapes
        self.std = float(getattr(config, "initializer_range", None) or 0.02)
        self.dtype = getattr(config, "dtype", None)
        self.seed = seed

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if name not in self.shapes:
            raise ValueError(f"the model of {self.directory} has no tensor {name!r}")
        if "norm" in name and name.endswith("weight"):
            return torch.ones(self.shapes[name], dtype=dtype, device=device)
        generator = torch.Generator(device=device).manual_seed(self.seed + zlib.crc32(name.encode()))
        return torch.empty(self.shapes[name], dtype=dtype, device=device).normal_(0, self.std, generator=generator)

    def dtype_of(self, name: str) -> torch.dtype | None:
        return self.dtype if self.dtype in (torch.float32, torch.float16, torch.bfloat16) else None


LOAD_FORMATS = ("auto", "safetensors", "dummy")


def open_checkpoint(directory: Path, config, load_format: str = "auto") -> Checkpoint | RandomCheckpoint:
    """load_format "auto"/"safetensors": the directory's safetensors; "dummy": random weights of the same shapes."""
    if load_format == "dummy":
        return RandomCheckpoint(config, directory)
    return Checkpoint(directory)
