"""Unlabeled text for exit tuning and calibration: files → token windows of a fixed length.

Plain text files are read whole; .jsonl / .json files give one document per record (its "text" field, else all
of its string fields joined by blank lines). Documents are joined with the EOS token and cut into windows; each
file contributes an equal share of the token budget (a short file's unused share goes to the others), and
windows are shuffled so that every batch mixes the sources.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

MIN_WINDOW = 16  # a trailing piece shorter than this is dropped


def _record_text(record, path: Path, line: int) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        parts = [v for v in record.values() if isinstance(v, str)]
        if parts:
            return "\n\n".join(parts)
    raise ValueError(f"{path}:{line}: a record must be a string or an object with string fields")


def read_documents(path: str | Path) -> Iterator[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{number}: not JSON ({e})") from e
                    yield _record_text(record, path, number)
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        for number, record in enumerate(data if isinstance(data, list) else [data], 1):
            yield _record_text(record, path, number)
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _file_tokens(tokenizer, path: str | Path, limit: int) -> list[int]:
    """The file's documents tokenized and joined with EOS, up to `limit` tokens."""
    eos = tokenizer.eos_token_id
    tokens: list[int] = []
    for text in read_documents(path):
        tokens.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            tokens.append(eos)
        if len(tokens) >= limit:
            break
    if not tokens:
        raise ValueError(f"corpus file {path} has no text")
    return tokens[:limit]


def _fair_shares(available: list[int], budget: int) -> list[int]:
    """Equal shares of `budget`; what a short source cannot use goes to the others."""
    shares = [0] * len(available)
    left, open_ = budget, sorted(range(len(available)), key=lambda i: available[i])
    while open_:
        each = left // len(open_)
        i = open_.pop(0)
        shares[i] = min(available[i], each if open_ else left)
        left -= shares[i]
    return shares


def token_windows(tokenizer, paths: list[str | Path], max_tokens: int, seq_len: int,
                  seed: int = 0) -> list[list[int]]:
    """Shuffled windows of up to `seq_len` tokens, about `max_tokens` in all, mixed evenly across `paths`."""
    if not paths:
        raise ValueError("at least one corpus file is needed")
    if max_tokens < MIN_WINDOW:
        raise ValueError(f"max_tokens must be >= {MIN_WINDOW}, got {max_tokens}")
    if seq_len < MIN_WINDOW:
        raise ValueError(f"seq_len must be >= {MIN_WINDOW}, got {seq_len}")
    streams = [_file_tokens(tokenizer, p, max_tokens) for p in paths]
    windows = []
    for stream, share in zip(streams, _fair_shares([len(s) for s in streams], max_tokens), strict=True):
        for start in range(0, share, seq_len):
            piece = stream[start:min(start + seq_len, share)]
            if len(piece) >= MIN_WINDOW:
                windows.append(piece)
    random.Random(seed).shuffle(windows)
    return windows


def take_tokens(windows: list[list[int]], budget: int) -> tuple[list[list[int]], list[list[int]]]:
    """(the leading windows holding exactly `budget` tokens, the rest); the window that crosses the budget is split
    between the two. Fewer tokens only when the windows run out."""
    if budget <= 0:
        return [], windows
    taken: list[list[int]] = []
    size = 0
    for i, window in enumerate(windows):
        if size + len(window) >= budget:
            cut = budget - size
            taken.append(window[:cut])
            return taken, ([window[cut:]] if cut < len(window) else []) + windows[i + 1:]
        taken.append(window)
        size += len(window)
    return taken, []


def batches(windows: list[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    """Consecutive groups of windows holding about `batch_tokens` tokens each (at least one window)."""
    group: list[list[int]] = []
    size = 0
    for window in windows:
        if group and size + len(window) > batch_tokens:
            yield group
            group, size = [], 0
        group.append(window)
        size += len(window)
    if group:
        yield group
