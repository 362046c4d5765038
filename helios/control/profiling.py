"""One candidate's profile on live traffic: the run that serves it (a full-depth engine with every probe exit
evaluated, on a KV pool that holds just its profile requests) and what a finished run yields, its Profile (the PHT
row), scored on the round's reference prompts so that candidates with different tokenizers compare on equal terms.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from helios.config import EngineConfig
from helios.control.profile import Profile, bits_per_byte, build_profile, probe_layers
from helios.control.requests import ControlledRequest
from helios.control.slo import SLO
from helios.engine.engine import LLMEngine
from helios.engine.probes import ProbeLog
from helios.model.source import resolve_model
from helios.sampling_params import SamplingParams


@dataclass
class ProfilingRun:
    model: str
    engine: LLMEngine
    log: ProbeLog
    requests: list[ControlledRequest] = field(default_factory=list)
    seconds: float = 0.0  # wall time of this run's steps

    @classmethod
    def start(cls, model: str, engine: LLMEngine, slo: SLO) -> ProfilingRun:
        """Puts a full-depth engine into profiling mode: no exit policy, every probe layer of the SLO (and every
        layer with a trained exit head) evaluated on every token."""
        heads = engine.model.exit_heads
        engine.set_exit_policy(None)
        log = ProbeLog(probe_layers(engine.model.total_layers, slo.probe_layers,
                                    heads.layers if heads is not None else ()))
        engine.set_probes(log)
        return cls(model, engine, log)

    @property
    def done(self) -> bool:
        return all(r.is_finished for r in self.requests)

    def step(self) -> None:
        started = time.perf_counter()
        self.engine.step()
        self.seconds += time.perf_counter() - started

    def profile(self) -> Profile:
        """The PHT row of the finished run: rates and probe pairs from its log, bits per byte of its requests'
        prompt text and outputs (the bytes of exactly the tokens that were scored)."""
        tokenizer = self.engine.tokenizer
        prompt_bytes: dict[str, int] = {}
        output_bytes: dict[str, int] = {}
        for request in self.requests:
            for cseq in request.seqs:
                if cseq.inner is None or cseq.engine is not self.engine:
                    continue
                inner = cseq.inner
                prompt_bytes[inner.request_id] = len(tokenizer.decode(inner.prompt_token_ids[1:],
                                                                      skip_special_tokens=True).encode())
                output_bytes[inner.request_id] = output_bytes.get(inner.request_id, 0) + len(
                    self.engine.outputs.text(cseq.seq).encode())
        return build_profile(self.model, self.engine.model.total_layers, self.log, self.seconds, prompt_bytes,
                             output_bytes, len(self.requests))

    def score_reference(self, profile: Profile, reference: list[ControlledRequest],
                        prompt_for: Callable[[ControlledRequest], object]) -> None:
        """Bits per byte of the round's reference prompts under this candidate. An empty `reference` (the round's
        first profile) becomes this run's own requests, whose prompt_bpb is that already; later candidates score
        the same text (one prefill each, on their idle profiling engine). prompt_for(request): the request's prompt
        for this candidate (token ids or text in its own template)."""
        if not reference:
            reference.extend(self.requests)
            profile.reference_bpb = profile.prompt_bpb
        else:
            engine, nats, num_bytes = self.engine, 0.0, 0
            for request in reference:
                ids = engine.make_request(prompt_for(request), SamplingParams(max_tokens=1)).prompt_token_ids
                if not 2 <= len(ids) < engine.max_model_len:
                    continue
                nats += engine.prompt_nats(ids)
                num_bytes += len(engine.tokenizer.decode(ids[1:], skip_special_tokens=True).encode())
            profile.reference_bpb = bits_per_byte(nats, num_bytes)
        profile.reference = hashlib.sha1("\x00".join(r.prompt_text for r in reference).encode()).hexdigest()[:12]


def profiling_pool(config: EngineConfig, slo: SLO) -> dict:
    """EngineConfig changes that give a profiling engine a KV pool for just its profile requests (at max_model_len):
    a profile adds the candidate's weights that no live engine shares and that much KV to the memory in use, not a
    second budget."""
    max_len = config.max_model_len or getattr(resolve_model(config.model).config, "max_position_embeddings",
                                              None) or 2048
    blocks = slo.profile_requests * -(-max_len // config.block_size)
    return {"kv_cache_blocks": blocks if config.kv_cache_blocks is None else min(blocks, config.kv_cache_blocks)}
