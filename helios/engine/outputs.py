"""Result types with vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """A token's log-probability, its rank in the distribution (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop token or stop string), "length", "abort", or None while running
    exit_layers: list[int] = field(default_factory=list)  # per token: 1-based layer it left the stack at
    confidences: list[float] = field(default_factory=list)  # per token: confidence measure at that exit
    # per token: {token id: Logprob} for the top SamplingParams.logprobs tokens and the chosen one (with early exit:
    # from the exit that emitted the token); None unless asked for
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # None when the prompt was given as token ids
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # first entry None, as in vLLM
