"""CandidateEngines: builds the engines of the candidate models for the control plane. Each candidate's tokenizer is
loaded once and shared by all its engines, an engine shares the weights of a live engine of the same model (only the
layers that one lacks are read from disk), and every build records the model's static facts in the repository."""

from __future__ import annotations

import dataclasses
import itertools
import time

from transformers import PreTrainedTokenizerBase

from helios.config import EngineConfig
from helios.control.repository import ModelFacts, ModelRepository, tokenizer_key
from helios.engine.engine import LLMEngine, load_tokenizer
from helios.exits.config import ExitConfig
from helios.model.source import resolve_model


class CandidateEngines:
    def __init__(self, configs: dict[str, EngineConfig], repository: ModelRepository):
        self.configs = configs
        self.repository = repository
        self.request_ids = itertools.count()  # shared by every engine: requests move between them
        self.tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self.tokenizer_keys: dict[str, str] = {}  # same key = same token ids: requests move by ids, not text

    def build(self, model: str, donor: LLMEngine | None = None, **changes) -> LLMEngine:
        """An engine of `model` with its trained exit heads when it has any (ExitConfig.heads, else the model's
        helios_exits/ folder); exit layers and thresholds are the control plane's to set. With a donor (a live
        engine of the same model) it shares the donor's weights and reads only the layers the donor lacks."""
        config = self.configs[model]
        heads = config.early_exit.heads if config.early_exit is not None else None
        config = dataclasses.replace(config, early_exit=ExitConfig(heads=heads), **changes)
        tokenizer = self.tokenizers.get(model)
        started = time.perf_counter()
        try:
            engine = LLMEngine(config, request_ids=self.request_ids, share_weights=donor, tokenizer=tokenizer)
        except ValueError:
            if donor is None:
                raise
            # not shareable: read it all
            engine = LLMEngine(config, request_ids=self.request_ids, tokenizer=tokenizer)
        seconds = time.perf_counter() - started
        m = engine.model
        self.tokenizers.setdefault(model, engine.tokenizer)
        self.tokenizer_keys.setdefault(model, tokenizer_key(engine.tokenizer))
        self.repository.set_facts(ModelFacts(
            name=model, total_layers=m.total_layers, bytes_per_layer=m.layer_bytes / m.loaded_layers,
            fixed_bytes=m.weight_bytes - m.layer_bytes,
            kv_bytes_per_token_per_layer=engine.kv_bytes_per_token // m.loaded_layers,
            tokenizer=self.tokenizer_keys[model],
            # measured only when layers came from disk (shared ones cost nothing)
            load_seconds_per_layer=seconds / engine.layers_read if engine.layers_read else None))
        return engine

    def load_tokenizers(self) -> None:
        """Every candidate's tokenizer, once, before serving starts: building a candidate's engine later (its
        profile, a switch) then reads only weights (Gemma 3's 262k-token tokenizer alone takes ~3 s). A candidate
        whose tokenizer cannot load fails later, when it is built, as a failure event."""
        for model, config in self.configs.items():
            if model in self.tokenizers:
                continue
            try:
                tokenizer = load_tokenizer(config.tokenizer or resolve_model(config.model).path)
            except Exception:  # reported when the candidate is built
                continue
            self.tokenizers[model] = tokenizer
            self.tokenizer_keys[model] = tokenizer_key(tokenizer)
