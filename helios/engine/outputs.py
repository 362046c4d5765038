"""Result types with vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop token or stop string), "length", or None while running
    exit_layers: list[int] = field(default_factory=list)  # per token: 1-based layer it left the stack at
    confidences: list[float] = field(default_factory=list)  # per token: confidence measure at that exit


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
