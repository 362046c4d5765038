"""A request and its sequences (one per sample, n of them): tokens so far, how many are in the KV cache, per-token
telemetry and logprobs, and why each finished."""

from __future__ import annotations

import enum
import itertools

import torch

from helios.sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 index: int = 0):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt + generated
        self.params = params
        self.status = Status.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache; reset to 0 by preemption
        self.finish_reason: str | None = None  # "stop", "length" or "abort"
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.stop_text_end: int | None = None  # where the generated text is cut (at or after a stop string)
        # text generated for this sample before this sequence (on another model): a stop string may begin in it;
        # a negative stop_text_end cuts into it
        self.stop_context = ""
        self.num_preemptions = 0
        self.block_hashes: list[int] = []  # chained hashes of this sequence's full blocks (prefix cache keys)
        self.num_published_blocks = 0  # leading blocks of its table already offered to the prefix cache
        self.exit_layers: list[int] = []  # per generated token: the 1-based layer it left at
        self.confidences: list[float] = []  # per generated token: its confidence there
        self.last_breach = False  # whether the newest token was forced out at the last layer below its threshold
        self.logprobs: list = []  # per generated token: TokenLogprobs (when params.logprobs is set)
        self.prompt_logprobs: list | None = None  # per prompt token (when params.prompt_logprobs is set)
        self.generator: torch.Generator | None = None
        if params.seed is not None:  # sample i of a seeded request draws from seed + i, as in vLLM
            self.generator = torch.Generator().manual_seed(params.seed + index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


class Request:
    """What one prompt asked for: n sequences with the same prompt and parameters, finished when all are."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.seqs = [Sequence(request_id, prompt, prompt_token_ids, params, index=i) for i in range(params.n)]

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)
