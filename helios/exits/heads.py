"""Exit heads on disk and in memory: one adapter per exit layer, run before the final norm + shared LM head.

Adapter kind "affine": h' = h·Wᵀ + b (d×d + bias, identity = the plain logit lens), optionally with an
exit-specific norm weight replacing the final norm's. Files in a heads directory:
  exit_heads.safetensors   layer{L}.weight [d, d], layer{L}.bias [d], optional layer{L}.norm_weight [d]
  manifest.json            base model fingerprint, exit layers, adapter kind, calibrated thresholds and
                           whatever the producer records (training tokens, loss, held-out agreement)
A model directory may carry its heads in a `helios_exits/` subfolder; the engine finds it on its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "exit_heads.safetensors"
MANIFEST_FILE = "manifest.json"
MODEL_SUBFOLDER = "helios_exits"
ADAPTER_KINDS = ("affine",)
FORMAT_VERSION = 1


def model_fingerprint(model) -> str:
    """Identifies the base model: architecture sizes plus a few embedding rows (rounded to bfloat16, so the
    serving dtype does not change it)."""
    sizes = f"{model.model_type}|{model.total_layers}|{model.hidden_size}|{model.vocab_size}"
    sample = model.embed_tokens[:4].detach().to("cpu", torch.bfloat16).float().contiguous()
    return hashlib.sha256(sizes.encode() + sample.numpy().tobytes()).hexdigest()[:32]


@dataclass
class ExitAdapter:
    weight: torch.Tensor  # [d, d]
    bias: torch.Tensor  # [d]
    norm_weight: torch.Tensor | None = None  # replaces the final norm's weight at this exit

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)

    @classmethod
    def identity(cls, dim: int, dtype: torch.dtype = torch.float32) -> ExitAdapter:
        return cls(torch.eye(dim, dtype=dtype), torch.zeros(dim, dtype=dtype))


@dataclass
class ExitHeads:
    fingerprint: str
    adapters: dict[int, ExitAdapter]  # 1-based exit layer -> adapter
    kind: str = "affine"
    # calibrated per-exit thresholds on the confidence measure below; None: the exit never reaches the target
    thresholds: dict[int, float | None] | None = None
    confidence: str | None = None
    info: dict = field(default_factory=dict)  # producer's notes: training tokens, loss, held-out agreement...

    @property
    def layers(self) -> list[int]:
        return sorted(self.adapters)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer, a in self.adapters.items():
            tensors[f"layer{layer}.weight"] = a.weight.detach().float().contiguous().cpu()
            tensors[f"layer{layer}.bias"] = a.bias.detach().float().contiguous().cpu()
            if a.norm_weight is not None:
                tensors[f"layer{layer}.norm_weight"] = a.norm_weight.detach().float().contiguous().cpu()
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        manifest = {
            "format_version": FORMAT_VERSION, "base_model_fingerprint": self.fingerprint, "adapter_kind": self.kind,
            "exit_layers": self.layers, "confidence": self.confidence,
            "thresholds": None if self.thresholds is None else {str(k): v for k, v in self.thresholds.items()},
            **self.info,
        }
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> ExitHeads:
        directory = Path(directory)
        manifest_path, weights_path = directory / MANIFEST_FILE, directory / WEIGHTS_FILE
        if not manifest_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"exit heads directory {directory} needs {MANIFEST_FILE} and {WEIGHTS_FILE}")
        try:
            manifest = json.loads(manifest_path.read_text())
            tensors = load_file(str(weights_path))
        except (json.JSONDecodeError, OSError, RuntimeError) as e:
            raise ValueError(f"exit heads in {directory} are unreadable: {e}") from e
        kind = manifest.get("adapter_kind")
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"exit heads in {directory}: adapter kind {kind!r} is not one of {ADAPTER_KINDS}")
        adapters = {}
        for layer in manifest.get("exit_layers", []):
            try:
                weight, bias = tensors[f"layer{layer}.weight"], tensors[f"layer{layer}.bias"]
            except KeyError as e:
                raise ValueError(f"exit heads in {directory}: manifest lists layer {layer} but {e} is missing") from e
            norm = tensors.get(f"layer{layer}.norm_weight")
            adapters[int(layer)] = ExitAdapter(weight.to(device, dtype), bias.to(device, dtype),
                                               None if norm is None else norm.to(device, dtype))
        thresholds = manifest.get("thresholds")
        known = {"format_version", "base_model_fingerprint", "adapter_kind", "exit_layers", "confidence", "thresholds"}
        return cls(fingerprint=manifest.get("base_model_fingerprint", ""), adapters=adapters, kind=kind,
                   thresholds=None if thresholds is None else {int(k): None if v is None else float(v)
                                                             for k, v in thresholds.items()},
                   confidence=manifest.get("confidence"),
                   info={k: v for k, v in manifest.items() if k not in known})

    def check_model(self, model, source: str | Path) -> None:
        """Heads made for another model are an error, never silently applied."""
        expected = model_fingerprint(model)
        if self.fingerprint != expected:
            raise ValueError(f"exit heads {source} were made for another model (fingerprint {self.fingerprint}, "
                             f"this model is {expected}): tune exits for this model")
        dim = model.hidden_size
        for layer, a in self.adapters.items():
            if not 1 <= layer < model.total_layers:
                raise ValueError(f"exit heads {source}: layer {layer} is outside 1..{model.total_layers - 1}")
            if tuple(a.weight.shape) != (dim, dim) or tuple(a.bias.shape) != (dim,):
                raise ValueError(f"exit heads {source}: layer {layer} adapter does not fit hidden size {dim}")


def find_model_heads(model_path: str | Path) -> Path | None:
    candidate = Path(model_path) / MODEL_SUBFOLDER
    return candidate if (candidate / MANIFEST_FILE).is_file() else None
