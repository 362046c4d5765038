"""LLM: the offline engine API, with vLLM's names (LLM, SamplingParams, generate, chat).

One LLM may be used from several threads: the engine's methods hold its lock, every step advances every
request, and each caller waits for its own. Whatever stops a caller early (an exception, Ctrl-C, a stream closed
or garbage-collected) aborts its unfinished requests, so their KV blocks come back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from pathlib import Path

import torch
from tqdm.auto import tqdm

from helios.config import EngineConfig
from helios.control import SLO, ControlledEngine
from helios.engine.engine import LLMEngine
from helios.engine.outputs import RequestOutput
from helios.engine.prompts import ChatPrompt, is_token_ids
from helios.engine.sequence import Request
from helios.exits.config import ExitConfig
from helios.sampling_params import SamplingParams


class LLM:
    """Loads a model (layers 1..num_layers only) and serves generate() with continuous batching.

    model: a local Hugging Face directory, a .gguf file, or an alias such as "smollm2-135m".
    memory_budget: bytes (int) or "2GiB" for weights + activations + KV pool; kv_cache_blocks overrides the
    pool size. num_layers loads only the first N decoder layers (the KV pool is sized for those only).
    enable_prefix_caching reuses the KV blocks of shared prompt prefixes (chained block hashes, as in vLLM).
    early_exit=ExitConfig(...) lets tokens leave the layer stack at confident exits (None: plain decoding).
    load_format="dummy" fills the model's real shapes with random weights (for benchmarks, as in vLLM): the
    directory then needs only config.json and a tokenizer.
    quantization="int8" | "int4" stores the decoder linears as int8 or int4 in groups of 32 with a scale and a
    minimum each (int4: Q4_1; int8 holds Q4_1 and Q8_0 blocks exactly) and the LM head as int8, dequantized on
    the fly by CPU kernels; activations stay float32, except that from 12 to 48 rows per linear (decode batches of
    12+) on CPUs with AVX-512 VNNI they are rounded to int16 per group of 32 (an error of ~1.5e-5 of the group's
    largest value) for integer dot products. Fewer weight bytes per token (faster decode) and more KV blocks in the
    same memory budget. CPU only. "w8a8" | "w4a8": the same weights, with those activations rounded to int8
    instead (llama.cpp's Q8_0): faster still at batch 12-48, greedy tokens drift from float32 sooner.
    kv_cache_dtype="auto" keeps the KV cache in the model's dtype; "float16" | "bfloat16" under a float32 model
    (CPU) halves its bytes: twice the sequences in a memory budget and half the attention's reads per decode step,
    keys and values rounded as they are stored (greedy tokens may drift from float32's; see the README).
    vLLM's names: tokenizer (a tokenizer directory other than the model's), gpu_memory_utilization (CUDA: the
    share of GPU memory for weights + activations + KV), seed, enforce_eager (helios always runs eagerly),
    trust_remote_code (helios never runs checkpoint code), tensor_parallel_size (1: helios runs on one device).

    The HELIOS control plane: model=[a, b, ...] (candidates) and/or slo=SLO(...) / "throughput" / "latency" /
    "energy" / "memory" profiles the candidates on live requests, serves the chosen model truncated to the chosen
    depth, and grows the depth or switches model on confidence breaches (see helios.control). `repository` is a
    JSON file that keeps the candidates' facts and profiles across restarts. Every other argument applies to each
    candidate; num_layers and early_exit thresholds are then the control plane's to choose (early_exit.heads
    still names trained exit heads).
    """

    def __init__(self, model: str | Path | list[str | Path], device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto",
                 memory_budget: int | str | None = None, block_size: int = 16, kv_cache_blocks: int | None = None,
                 max_num_seqs: int = 256, max_model_len: int | None = None, num_layers: int | None = None,
                 max_num_batched_tokens: int | None = None, seed: int = 0, enable_prefix_caching: bool = True,
                 early_exit: ExitConfig | None = None, load_format: str = "auto", *,
                 quantization: str | None = None, kv_cache_dtype: str | torch.dtype = "auto",
                 tokenizer: str | Path | None = None, gpu_memory_utilization: float | None = None,
                 enforce_eager: bool = False, trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                 slo: SLO | str | dict | None = None, repository: str | Path | None = None):
        models = list(model) if isinstance(model, (list, tuple)) else [model]
        if not models:
            raise ValueError("model must name at least one model")
        controlled = slo is not None or len(models) > 1
        if controlled and num_layers is not None:
            raise ValueError("num_layers is chosen by the control plane when slo or several models are given")
        if repository is not None and not controlled:
            raise ValueError("repository is the control plane's: pass slo=... (or several models) with it")
        config = EngineConfig(model=models[0], device=device, dtype=dtype, memory_budget=memory_budget,
                              block_size=block_size, kv_cache_blocks=kv_cache_blocks, max_num_seqs=max_num_seqs,
                              max_model_len=max_model_len, num_layers=num_layers,
                              max_num_batched_tokens=max_num_batched_tokens, seed=seed,
                              enable_prefix_caching=enable_prefix_caching, early_exit=early_exit,
                              load_format=load_format, quantization=quantization,
                              kv_cache_dtype=kv_cache_dtype, tokenizer=tokenizer,
                              gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                              trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size)
        if controlled:
            configs = [dataclasses.replace(config, model=m) for m in models]
            self.engine = ControlledEngine(configs, SLO.parse(slo if slo is not None else "throughput"), repository)
        else:
            self.engine = LLMEngine(config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ---- requests ---------------------------------------------------------------------------------------------
    def _requests(self, prompts, sampling_params) -> list[Request]:
        """Validates and tokenizes every prompt before anything is queued: a bad request leaves the engine as it was."""
        if isinstance(prompts, (str, dict)) or is_token_ids(prompts):
            prompts = [prompts]
        if not isinstance(prompts, SequenceABC) or isinstance(prompts, (bytes, bytearray)):
            raise TypeError("prompts must be a prompt (str, token-id list, {'prompt': ...} or "
                            f"{{'prompt_token_ids': [...]}}) or a list of prompts, got {type(prompts).__name__}")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif not isinstance(sampling_params, SequenceABC) or len(sampling_params) != len(prompts):
            raise ValueError("sampling_params must be one SamplingParams or a list with one per prompt "
                             f"({len(prompts)} prompts)")
        return [self.engine.make_request(p, sp) for p, sp in zip(prompts, sampling_params, strict=True)]

    def generate(self, prompts=None, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 use_tqdm: bool = True, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generates for every prompt; returns one RequestOutput per prompt, in prompt order (with n outputs each).
        A prompt is text, a list of token ids, {"prompt": text} or {"prompt_token_ids": ids}. `params` is the old
        name of `sampling_params`. If anything interrupts it, the requests it queued are aborted."""
        if params is not None:
            if sampling_params is not None:
                raise TypeError("pass sampling_params or its old name params, not both")
            sampling_params = params
        requests = self._requests(prompts, sampling_params)
        try:
            for request in requests:
                self.engine.add_request(request)
            with tqdm(total=len(requests), desc="Generating", unit="req", disable=not use_tqdm) as bar:
                done = 0
                while done < len(requests):
                    if not self.engine.has_unfinished():
                        raise RuntimeError("engine stopped with unfinished requests")  # never expected
                    self.engine.step()
                    finished = sum(r.is_finished for r in requests)
                    bar.update(finished - done)
                    done = finished
        except BaseException:
            self._abort_unfinished(requests)
            raise
        return [self.engine.output(r) for r in requests]

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generates replies to one conversation (a list of {"role", "content"} messages) or a list of them,
        formatted with the tokenizer's chat template (or `chat_template`, a Jinja string)."""
        if isinstance(messages, SequenceABC) and messages and all(isinstance(m, dict) for m in messages):
            conversations = [messages]
        else:
            conversations = messages
        if not isinstance(conversations, SequenceABC) or not conversations:
            raise TypeError("messages must be a conversation (a list of {'role': ..., 'content': ...} dicts) or a "
                            "list of conversations")
        prompts = [self.chat_prompt(c, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                                    **(chat_template_kwargs or {})) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_prompt(self, conversation, chat_template: str | None = None, add_generation_prompt: bool = True,
                    **template_kwargs) -> dict:
        """One conversation rendered with the chat template, as a {"prompt", "prompt_token_ids"} prompt (the
        template supplies any BOS text, so no special tokens are added again)."""
        if not isinstance(conversation, SequenceABC) or not conversation or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in conversation):
            raise TypeError("a conversation is a non-empty list of {'role': ..., 'content': ...} dicts")
        tokenizer = self.get_tokenizer()
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"model {self.engine.source.name!r} has no chat template (its tokenizer sets none): "
                             "pass chat_template='<a Jinja template>', or use generate() with a plain prompt")
        return ChatPrompt(tokenizer, list(conversation), chat_template, add_generation_prompt, **template_kwargs)

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the generated text of one prompt piece by piece as tokens arrive: exactly the text generate()
        returns, whoever else steps the engine meanwhile. Closing the iterator (or dropping it) aborts the
        request. The prompt is validated now; the request starts with the first next()."""
        (request,) = self._requests([prompt], sampling_params)
        if request.params.n != 1:
            raise ValueError(f"stream() yields one sample's text: SamplingParams.n must be 1, got {request.params.n}")
        return self._stream(request)

    def _stream(self, request: Request) -> Iterator[str]:
        seq = request.seqs[0]
        emitted = ""
        self.engine.add_request(request)
        try:
            while True:
                finished = seq.is_finished  # read first: text after it is final if it was set
                text = self.engine.stable_text(seq)
                if len(text) > len(emitted):
                    yield text[len(emitted):]
                    emitted = text
                if finished:
                    return
                self.engine.step()
        finally:
            if not request.is_finished:
                self.engine.abort(request.request_id)

    def abort(self, request_id: str | list[str]) -> None:
        """Stops requests by id (RequestOutput.request_id): they finish with finish_reason "abort" and free their
        KV blocks. Unknown or finished ids are ignored."""
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            self.engine.abort(rid)

    def _abort_unfinished(self, requests: list[Request]) -> None:
        for request in requests:
            if not request.is_finished:
                self.engine.abort(request.request_id)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (blocks in use stay valid; they just stop being shareable)."""
        self.engine.reset_prefix_cache()

    def stats(self) -> dict:
        return self.engine.stats()

    def set_slo(self, slo: SLO | str | dict) -> None:
        """Changes the control plane's SLO; the candidates are profiled again for it."""
        if not isinstance(self.engine, ControlledEngine):
            raise ValueError("set_slo needs the control plane: create the LLM with slo=... (or several models)")
        self.engine.set_slo(slo)
