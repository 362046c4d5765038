"""A user's request as the control plane sees it: it outlives the engines that serve it. Each sample is carried
by one engine sequence at a time; when it moves to a model with another tokenizer, the text it has generated so
far becomes a fixed prefix and a new sequence continues from prompt + that text."""

from __future__ import annotations

from dataclasses import dataclass, field

from helios.engine.engine import LLMEngine
from helios.engine.output_processor import stable_prefix
from helios.engine.outputs import CompletionOutput, RequestOutput
from helios.engine.prompts import ChatPrompt
from helios.engine.sequence import Request, Sequence
from helios.sampling_params import SamplingParams


@dataclass
class ControlledSeq:
    index: int
    engine: LLMEngine | None = None
    inner: Request | None = None  # the engine request carrying this sample
    seq: Sequence | None = None
    prefix_text: str = ""  # generated on earlier models (cross-tokenizer switches)
    prefix_token_ids: list[int] = field(default_factory=list)
    prefix_exit_layers: list[int] = field(default_factory=list)
    prefix_confidences: list[float] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # every model that generated part of it, in order
    failed: str | None = None  # why it could not be served (it finishes with finish_reason "abort")

    @property
    def is_finished(self) -> bool:
        return self.failed is not None or (self.seq is not None and self.seq.is_finished)

    @property
    def num_output_tokens(self) -> int:
        return len(self.prefix_token_ids) + (self.seq.num_output_tokens if self.seq is not None else 0)

    def text(self) -> str:
        """Everything generated for this sample, cut at a stop string (which may begin in the prefix)."""
        if self.seq is None:
            return self.prefix_text
        cut = self.seq.stop_text_end
        if cut is not None and cut < 0:
            return self.prefix_text[:len(self.prefix_text) + cut]
        return self.prefix_text + self.engine.outputs.text(self.seq)

    def stable_text(self) -> str:
        """The text a stream may show: held back as one sequence's would be, over prefix and continuation alike."""
        text = self.text()
        if self.seq is None or self.seq.is_finished:
            return text
        return stable_prefix(text, self.seq.params.stop)

    def completion(self) -> CompletionOutput:
        if self.seq is None:
            return CompletionOutput(self.index, self.prefix_text, list(self.prefix_token_ids),
                                    "abort" if self.failed else None)
        out = self.engine.outputs.completion(self.seq)
        out.index = self.index
        out.text = self.text()
        out.token_ids = self.prefix_token_ids + out.token_ids
        out.exit_layers = self.prefix_exit_layers + out.exit_layers
        out.confidences = self.prefix_confidences + out.confidences
        return out

    def carry_over(self) -> None:
        """Fixes what the current sequence generated as prefix (before it continues elsewhere as text)."""
        self.prefix_text += self.engine.outputs.text(self.seq)
        self.prefix_token_ids += self.seq.output_token_ids
        self.prefix_exit_layers += self.seq.exit_layers
        self.prefix_confidences += self.seq.confidences

    def remaining_params(self, params: SamplingParams) -> SamplingParams:
        """The parameters for continuing this sample alone: n=1, the tokens left, its own seed."""
        done = len(self.prefix_token_ids)
        left = params.clone()
        left.n = 1
        if params.max_tokens is not None:
            left.max_tokens = max(1, params.max_tokens - done)
        left.min_tokens = max(0, params.min_tokens - done)
        if params.seed is not None:
            left.seed = params.seed + self.index
        return left


class ControlledRequest:
    def __init__(self, request_id: str, prompt_text: str, prompt_token_ids: list[int] | None, params: SamplingParams,
                 chat: ChatPrompt | None = None):
        self.request_id = request_id
        self.prompt_text = prompt_text
        self.prompt_token_ids = prompt_token_ids  # in the first candidate's tokenizer (None: text only)
        self.params = params
        self.chat = chat  # a conversation: each model renders it with its own chat template
        self.seqs = [ControlledSeq(i) for i in range(params.n)]
        self.profiled_by: str | None = None  # candidate whose profile this request served

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def prompt_for(self, tokenizer, continuation: str = "") -> str | dict:
        """The prompt (+ text generated so far) for a model with another tokenizer than the first candidate's: a
        conversation in that model's chat template (the first candidate's rendering when it has none), else the
        prompt text."""
        if self.chat is None:
            return self.prompt_text + continuation
        text = (self.chat.render(tokenizer) or self.prompt_text) + continuation
        return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

    def output(self) -> RequestOutput:
        first = next((s.inner for s in self.seqs if s.inner is not None), None)
        prompt_logprobs = None
        if first is not None and self.params.prompt_logprobs is not None:
            prompt_logprobs = first.seqs[0].prompt_logprobs and self.seqs[0].engine.output(first).prompt_logprobs
        ids = self.prompt_token_ids if self.prompt_token_ids is not None else (
            first.prompt_token_ids if first is not None else [])
        return RequestOutput(self.request_id, self.prompt_text, list(ids), [s.completion() for s in self.seqs],
                             self.is_finished, prompt_logprobs)
