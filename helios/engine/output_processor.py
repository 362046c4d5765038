"""Turns sampled tokens into what users see: appends each token with its telemetry and logprobs, decides when a
sequence stops (EOS, stop tokens, stop strings, length; none of the first three before min_tokens), detokenizes
(also the stable prefix a stream may show before the sequence ends), and builds vLLM's RequestOutput."""

from __future__ import annotations

from helios.engine.outputs import CompletionOutput, Logprob, RequestOutput
from helios.engine.sampler import TokenLogprobs
from helios.engine.sequence import Request, Sequence


def stable_prefix(text: str, stops: list[str] | None) -> str:
    """What a running sequence's text can no longer lose: a trailing replacement character (the next token may
    complete a multi-byte character) and any tail that could begin a stop string are held back."""
    if text.endswith("\ufffd"):
        text = text[:-1]
    held = 0
    for stop in stops or []:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return text[: len(text) - held]


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    # ---- stopping ---------------------------------------------------------------------------------------------
    def check_finished(self, seq: Sequence) -> None:
        """Sets seq.finish_reason (and stop_reason / stop_text_end) after its newest token."""
        p, token = seq.params, seq.token_ids[-1]
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
                return
            if p.stop_token_ids and token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
                return
            if p.stop and self._stop_string(seq):
                seq.finish_reason = "stop"
                return
        limit = p.max_tokens if p.max_tokens is not None else self.max_model_len
        if seq.num_output_tokens >= limit or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def _stop_string(self, seq: Sequence) -> bool:
        context = seq.stop_context
        text = context + self.decode(seq.output_token_ids, seq.params.skip_special_tokens)
        hits = [(text.find(s), s) for s in seq.params.stop if s in text]
        if not hits:
            return False
        start, stop = min(hits)
        seq.stop_reason = stop
        end = start + len(stop) if seq.params.include_stop_str_in_output else start
        seq.stop_text_end = end - len(context)
        return True

    # ---- text -------------------------------------------------------------------------------------------------
    def text(self, seq: Sequence) -> str:
        """The generated text, cut at a stop string when one ended the sequence (a cut inside the sequence's
        stop_context leaves none of its own text)."""
        text = self.decode(seq.output_token_ids, seq.params.skip_special_tokens)
        return text[: max(0, seq.stop_text_end)] if seq.stop_text_end is not None else text

    def stable_text(self, seq: Sequence) -> str:
        """The part of the text that can no longer change (see stable_prefix); a finished sequence's is all of it."""
        text = self.text(seq)
        return text if seq.is_finished else stable_prefix(text, seq.params.stop)

    # ---- outputs ----------------------------------------------------------------------------------------------
    def _logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        ranks = {token: rank for rank, (token, _) in enumerate(entry.top, start=1)}
        values = dict(entry.top)
        values[entry.token] = entry.logprob
        ranks[entry.token] = entry.rank
        return {token: Logprob(value, ranks[token], self.decode([token], skip_special_tokens=False))
                for token, value in values.items()}

    def completion(self, seq: Sequence) -> CompletionOutput:
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = [self._logprob_dict(entry) for entry in seq.logprobs]
        cumulative = sum(entry.logprob for entry in seq.logprobs) if seq.params.logprobs is not None else None
        return CompletionOutput(seq.index, self.text(seq), seq.output_token_ids, seq.finish_reason,
                                list(seq.exit_layers), list(seq.confidences), logprobs=logprobs,
                                cumulative_logprob=cumulative, stop_reason=seq.stop_reason)

    def request_output(self, request: Request) -> RequestOutput:
        first = request.seqs[0]
        prompt_logprobs = None
        if request.params.prompt_logprobs is not None and first.prompt_logprobs is not None:
            prompt_logprobs = [None] + [self._logprob_dict(entry) for entry in first.prompt_logprobs]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             [self.completion(seq) for seq in request.seqs], finished=request.is_finished,
                             prompt_logprobs=prompt_logprobs)
