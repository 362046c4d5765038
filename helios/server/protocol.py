"""The OpenAI API's request bodies (the fields it names, plus vLLM's sampling extensions and helios' telemetry flag),
their translation into SamplingParams, and OpenAI-style errors."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from helios.sampling_params import SamplingParams


class APIError(Exception):
    """An error the client sees as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_value(error: Exception, param: str | None = None) -> APIError:
    """A 400 for a ValueError/TypeError raised while building a request; SamplingParams errors name their field."""
    message = str(error)
    named = re.search(r"SamplingParams\.(\w+)", message)
    code = "context_length_exceeded" if type(error).__name__ == "PromptTooLongError" else None
    return APIError(message, param=named.group(1) if named else param, code=code)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both endpoints take. Unknown fields are ignored (as vLLM does); fields helios cannot honour are refused."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int = -1
    min_p: float = 0.0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # helios: per choice, the layer each token left the stack at, its confidence, the model and depth
    exit_telemetry: bool = False

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        if self.logit_bias:
            raise APIError("logit_bias is not supported by helios", param="logit_bias")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise APIError(f"stop takes up to 4 sequences, got {len(self.stop)}", param="stop")
        try:
            return SamplingParams(
                n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                seed=self.seed, stop=self.stop, max_tokens=max_tokens, min_tokens=self.min_tokens,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos,
                stop_token_ids=self.stop_token_ids, skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output)
        except (ValueError, TypeError) as e:
            raise bad_value(e) from e

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI default for completions
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    def check(self) -> None:
        if self.echo:
            raise APIError("echo is not supported by helios", param="echo")
        if self.suffix:
            raise APIError("suffix is not supported by helios", param="suffix")
        if self.logprobs is not None:
            raise APIError("logprobs is not supported by the helios server yet", param="logprobs")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError("best_of must equal n (helios returns every sample)", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """One prompt per entry: a string, a list of strings, token ids, or a list of token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            return [prompt]
        if not prompt:
            raise APIError("prompt must not be empty", param="prompt")
        return list(prompt)


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        if self.logprobs or self.top_logprobs:
            raise APIError("logprobs is not supported by the helios server yet", param="logprobs")
        if self.tools:
            raise APIError("tools are not supported by helios", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError("response_format other than text is not supported by helios", param="response_format")

    def conversation(self) -> list[dict[str, str]]:
        """The messages with their content as text (content parts of type "text" are joined)."""
        conversation = []
        for i, message in enumerate(self.messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str):
                raise APIError(f"messages[{i}] needs a string 'role'", param="messages")
            if isinstance(content, list):
                if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                    raise APIError(f"messages[{i}].content: helios takes only parts of type 'text'", param="messages")
                content = "".join(str(p.get("text", "")) for p in content)
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise APIError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
            conversation.append({"role": role, "content": content})
        return conversation

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
