"""Model repository: each candidate's static facts (layers, bytes per layer, embedding and LM-head bytes, KV bytes
per token per layer, tokenizer) and its Performance History Table rows, persisted as JSON so that a restart
starts warm."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from helios.control.profile import Profile


def tokenizer_key(tokenizer) -> str:
    """Equal keys: the same token ids mean the same text, so sequences can move by token ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha1(repr(vocab).encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}:{len(vocab)}:{digest}"


@dataclass
class ModelFacts:
    name: str
    total_layers: int
    bytes_per_layer: float
    fixed_bytes: int  # embedding + LM head (+ final norm): loaded at every depth
    kv_bytes_per_token_per_layer: int
    tokenizer: str  # class and vocabulary size: candidates with equal ones hand sequences over by token ids
    load_seconds_per_layer: float | None = None  # measured when layers were loaded

    def weight_bytes(self, depth: int) -> int:
        return int(self.fixed_bytes + self.bytes_per_layer * depth)


@dataclass
class Candidate:
    facts: ModelFacts
    history: list[Profile] = field(default_factory=list)  # newest last

    @property
    def latest(self) -> Profile | None:
        return self.history[-1] if self.history else None


class ModelRepository:
    """Candidates by name. path: a JSON file (None: in memory only)."""

    HISTORY = 8  # PHT rows kept per candidate

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.candidates: dict[str, Candidate] = {}
        if self.path is not None and self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            for name, entry in data["candidates"].items():
                self.candidates[name] = Candidate(ModelFacts(**entry["facts"]),
                                                  [Profile.from_json(p) for p in entry["history"]])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path} is not a helios model repository ({e}); move it away to start cold") from e

    def save(self) -> None:
        if self.path is None:
            return
        data = {"candidates": {name: {"facts": asdict(c.facts), "history": [p.to_json() for p in c.history]}
                               for name, c in self.candidates.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # written beside and renamed: a crash never leaves half a file
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)

    def set_facts(self, facts: ModelFacts) -> None:
        entry = self.candidates.get(facts.name)
        if entry is None:
            self.candidates[facts.name] = Candidate(facts)
        else:
            if facts.load_seconds_per_layer is None:
                facts.load_seconds_per_layer = entry.facts.load_seconds_per_layer
            entry.facts = facts

    def record(self, profile: Profile) -> None:
        history = self.candidates[profile.model].history
        history.append(profile)
        del history[:-self.HISTORY]
        self.save()

    def pht(self) -> list[dict]:
        """The latest row of every profiled candidate, without raw pairs."""
        return [c.latest.summary() for c in self.candidates.values() if c.latest is not None]
