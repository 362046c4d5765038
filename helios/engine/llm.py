"""LLM: the offline engine API, with vLLM's names (LLM, SamplingParams, generate)."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from pathlib import Path

import torch
from tqdm.auto import tqdm

from helios.config import EngineConfig
from helios.engine.engine import LLMEngine
from helios.engine.outputs import RequestOutput
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
    """

    def __init__(self, model: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                 memory_budget: int | str | None = None, block_size: int = 16, kv_cache_blocks: int | None = None,
                 max_num_seqs: int = 256, max_model_len: int | None = None, num_layers: int | None = None,
                 max_num_batched_tokens: int | None = None, seed: int = 0, enable_prefix_caching: bool = True,
                 early_exit: ExitConfig | None = None, load_format: str = "auto"):
        config = EngineConfig(model=model, device=device, dtype=dtype, memory_budget=memory_budget,
                              block_size=block_size, kv_cache_blocks=kv_cache_blocks, max_num_seqs=max_num_seqs,
                              max_model_len=max_model_len, num_layers=num_layers,
                              max_num_batched_tokens=max_num_batched_tokens, seed=seed,
                              enable_prefix_caching=enable_prefix_caching, early_exit=early_exit,
                              load_format=load_format)
        self.engine = LLMEngine(config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _sequences(self, prompts, params):
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, SequenceABC) or isinstance(prompts, (bytes, bytearray)):
            raise TypeError(f"prompts must be a prompt or a list of prompts (str or {{'prompt_token_ids': [...]}}), "
                            f"got {type(prompts).__name__}")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif not isinstance(params, SequenceABC) or len(params) != len(prompts):
            raise ValueError("params must be one SamplingParams or a list with one per prompt "
                             f"({len(prompts)} prompts)")
        # Validate everything before queueing anything: a bad request leaves the engine untouched.
        return [self.engine.make_sequence(p, sp) for p, sp in zip(prompts, params, strict=True)]

    def generate(self, prompts: str | dict | list[str | dict],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt; returns one RequestOutput per prompt, in prompt order. A prompt is text,
        {"prompt": text} or {"prompt_token_ids": [ids]} (vLLM's forms; the output's prompt is None for ids)."""
        seqs = self._sequences(prompts, params)
        for seq in seqs:
            self.engine.add_sequence(seq)
        with tqdm(total=len(seqs), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            remaining = {seq.seq_id for seq in seqs}
            while remaining:
                if not self.engine.has_unfinished():
                    raise RuntimeError("engine stopped with unfinished requests")  # never expected
                for seq in self.engine.step():
                    if seq.is_finished and seq.seq_id in remaining:
                        remaining.discard(seq.seq_id)
                        bar.update(1)
        return [self.engine.to_output(seq) for seq in seqs]

    def stream(self, prompt: str | dict, params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the generated text of one prompt piece by piece as tokens arrive."""
        (seq,) = self._sequences([prompt], params)
        self.engine.add_sequence(seq)
        emitted = ""
        while not seq.is_finished:
            self.engine.step()
            text = self.engine.output_text(seq)
            # Hold back a trailing replacement char: the next token may complete a multi-byte character.
            stable = text[:-1] if text.endswith("\ufffd") and not seq.is_finished else text
            if len(stable) > len(emitted) and stable.startswith(emitted):
                yield stable[len(emitted):]
                emitted = stable

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (blocks in use stay valid; they just stop being shareable)."""
        self.engine.reset_prefix_cache()

    def stats(self) -> dict:
        return self.engine.stats()
