"""SamplingParams with vLLM's names and meanings; every bad value raises naming the field, when the object is made
and again whenever a field is assigned (so a mutated SamplingParams can never reach the engine unchecked)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


def _check_number(name: str, value, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise TypeError(f"SamplingParams.{name} must be {kind}, got {type(value).__name__}")
    if not integer and (math.isnan(value) or math.isinf(value)):
        raise ValueError(f"SamplingParams.{name} must be finite, got {value}")


def _check_range(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {rule}, got {value}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"SamplingParams.{name} must be a bool, got {type(value).__name__}")


def _optional_count(name: str, value, minimum: int) -> None:
    if value is not None:
        _check_number(name, value, integer=True)
        _check_range(name, value, value >= minimum, f">= {minimum} (or None)")


@dataclass
class SamplingParams:
    """n: samples per prompt (they share the prompt's KV blocks through the prefix cache).
    presence_penalty / frequency_penalty (in [-2, 2]): subtracted from the logits of tokens already generated, once
    / per occurrence. repetition_penalty (> 0, 1 = off): logits of tokens in the prompt or the output are divided by
    it when positive, multiplied when negative. temperature (0 = greedy), top_p, top_k (0 or -1 = off), min_p (drop
    tokens below min_p x the top probability). max_tokens (None: up to the context limit), min_tokens (EOS, stop
    tokens and stop strings are ignored before that many tokens). logprobs / prompt_logprobs: that many top
    log-probabilities per generated / prompt token (plus the chosen token's), of the distribution actually sampled
    from (after penalties, temperature and filtering; greedy rows: after penalties)."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.validate()
        object.__setattr__(self, "_frozen_checks", True)

    def __setattr__(self, name: str, value) -> None:
        """Assigning a field re-validates the whole object; an invalid value is refused and the old one kept."""
        if not getattr(self, "_frozen_checks", False) or name not in self._field_names():
            object.__setattr__(self, name, value)
            return
        old = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except (TypeError, ValueError):
            object.__setattr__(self, name, old)
            raise

    @classmethod
    def _field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def validate(self) -> None:
        """Checks every field (normalizing `stop` to a list); the engine calls it again on every request."""
        set_ = object.__setattr__  # normalization must not recurse through __setattr__
        _check_number("n", self.n, integer=True)
        _check_range("n", self.n, self.n >= 1, ">= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            _check_range(name, value, -2 <= value <= 2, "in [-2, 2]")
        _check_number("repetition_penalty", self.repetition_penalty)
        _check_range("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0 (1 = off)")
        _check_number("temperature", self.temperature)
        _check_range("temperature", self.temperature, self.temperature >= 0, "finite and >= 0 (0 = greedy)")
        _check_number("top_p", self.top_p)
        _check_range("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]")
        _check_number("top_k", self.top_k, integer=True)
        _check_range("top_k", self.top_k, self.top_k >= -1, "-1 or 0 (off) or >= 1")
        _check_number("min_p", self.min_p)
        _check_range("min_p", self.min_p, 0 <= self.min_p <= 1, "in [0, 1]")
        if self.seed is not None:
            _check_number("seed", self.seed, integer=True)
        if isinstance(self.stop, str):
            set_(self, "stop", [self.stop])
        if self.stop is not None:
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise TypeError("SamplingParams.stop must be a string or a list of strings")
            if any(s == "" for s in self.stop):
                raise ValueError("SamplingParams.stop must not contain empty strings")
            set_(self, "stop", list(self.stop))
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
            ):
                raise TypeError("SamplingParams.stop_token_ids must be a list of non-negative ints")
            set_(self, "stop_token_ids", list(self.stop_token_ids))
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            _check_bool(name, getattr(self, name))
        _optional_count("max_tokens", self.max_tokens, 1)
        _check_number("min_tokens", self.min_tokens, integer=True)
        _check_range("min_tokens", self.min_tokens, self.min_tokens >= 0, ">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens ({self.min_tokens}) must not exceed max_tokens "
                             f"({self.max_tokens})")
        _optional_count("logprobs", self.logprobs, 0)
        _optional_count("prompt_logprobs", self.prompt_logprobs, 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def top_k_active(self) -> bool:
        return self.top_k > 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def clone(self) -> SamplingParams:
        """A validated copy with its own lists: what a request keeps, so later changes to this object don't leak in."""
        self.validate()
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("stop", "stop_token_ids"):
            if values[name] is not None:
                values[name] = list(values[name])
        return SamplingParams(**values)
