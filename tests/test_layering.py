"""The packages form a one-way stack: cli -> server -> async_llm -> llm -> control -> tuning -> engine -> model,
exits -> ops -> helios._C.
An import from a lower layer into a higher one (even inside a function) fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "helios"

# rank of each top-level part of helios; a module may import its own part or any part of lower rank
RANKS = {
    "_C": 0, "kernels": 0, "utils": 0, "sampling_params": 0,
    "_ext": 1, "ops": 1, "kv": 2,
    "model": 3, "exits": 3,
    "config": 4, "engine": 4,
    "tuning": 5,
    "control": 6,
    "llm": 7,  # the LLM facade, and what helios/__init__ exports (LLM, SamplingParams, ..., __version__)
    "async_llm": 8,  # the LLM facade in asyncio form (drives an LLM's engine from a thread)
    "server": 9,  # the OpenAI-compatible HTTP server over AsyncLLM
    "cli": 10,  # `helios serve` starts the server
}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "helios" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "helios":  # from helios import LLM, ... names the top-level modules' exports
                found.extend((node.lineno, f"helios.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def _modules():
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] != "__init__.py"]


def test_every_part_has_a_rank():
    parts = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _modules()}
    assert parts <= set(RANKS), f"give these parts of helios a rank in RANKS: {sorted(parts - set(RANKS))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path: Path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    upward = []
    for line, module in _imports(path):
        part = _part(module)
        if part is None or part == own:
            continue
        target = RANKS.get(part)
        if target is None:  # a name from helios/__init__: importing the package loads the LLM facade
            target = RANKS["llm"]
        if target >= RANKS[own] and (own, part) not in ALLOWED_SIDEWAYS:
            upward.append(f"line {line}: {module}")
    assert not upward, f"{path.relative_to(PACKAGE)} imports upward or sideways: {upward}"


# same-rank imports by design: the engine builds itself from EngineConfig; the extension loader and the ops that
# wrap helios._C need each other (loading registers the ops' fake kernels)
ALLOWED_SIDEWAYS = {("engine", "config"), ("_ext", "ops"), ("ops", "_ext")}
