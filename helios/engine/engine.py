"""LLMEngine: owns model, KV cache, scheduler and tokenizer; add_request / step / has_unfinished.

Builds everything in a fixed order (resolve → config checks → load layers 1..L → size the KV pool)
so that a bad argument fails before anything large is allocated.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from collections.abc import Iterator

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from helios.config import EngineConfig
from helios.engine.output_processor import OutputProcessor
from helios.engine.outputs import RequestOutput
from helios.engine.probes import ProbeLog
from helios.engine.prompts import PromptTooLongError, parse_prompt
from helios.engine.runner import ModelRunner
from helios.engine.scheduler import ScheduledSeq, Scheduler
from helios.engine.sequence import Request, Sequence, Status
from helios.exits.config import ExitPolicy
from helios.exits.heads import ExitHeads, find_model_heads
from helios.kv.cache import KVCache, kv_bytes_per_token
from helios.kv.sizing import kv_pool_blocks
from helios.model.checkpoint import open_checkpoint
from helios.model.registry import check_supported, load_model, weight_reader
from helios.model.source import resolve_model
from helios.ops import PagedAttentionOps
from helios.sampling_params import SamplingParams
from helios.utils.device import resolve_device, resolve_dtype, resolve_kv_cache_dtype
from helios.utils.locking import locked

logger = logging.getLogger("helios")


def _reset_for_recompute(seq: Sequence) -> None:
    """A sequence about to be re-prefilled elsewhere: no K/V computed, no blocks, waiting (keeps its tokens)."""
    seq.num_computed_tokens = 0
    seq.num_published_blocks = 0
    seq.status = Status.WAITING


def load_tokenizer(path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e


class LLMEngine:
    def __init__(self, config: EngineConfig, request_ids: Iterator[int] | None = None,
                 share_weights: LLMEngine | None = None, tokenizer: PreTrainedTokenizerBase | None = None):
        """request_ids: where request ids come from (engines that hand requests to each other share one).
        share_weights: an engine of the same model, dtype, device, quantization and max_model_len whose weights
        this one reuses (embedding, LM head and the layers both have); only layers it lacks are read.
        tokenizer: an already loaded tokenizer of config.tokenizer (or the model) to use instead of loading it
        again (a large vocabulary's tokenizer takes seconds to parse; the control plane builds many engines)."""
        self.config = config
        self.device = resolve_device(config.device)
        self.source = resolve_model(config.model)
        hf = self.source.config
        check_supported(hf)
        if config.quantization is not None and self.device.type != "cpu":
            raise ValueError(f"quantization={config.quantization!r} runs on CPU only (its kernels are in helios._C's "
                             f"CPU build); on {self.device.type} serve the float model (quantization=None)")
        total_layers = hf.num_hidden_layers
        num_layers = config.num_layers if config.num_layers is not None else total_layers
        if not 1 <= num_layers <= total_layers:
            raise ValueError(f"num_layers={num_layers} is outside 1..{total_layers} (the model's layer count)")
        max_positions = getattr(hf, "max_position_embeddings", None) or 2048
        self.max_model_len = config.max_model_len or max_positions
        if self.max_model_len > max_positions:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings "
                             f"({max_positions})")
        checkpoint = open_checkpoint(self.source.path, hf, config.load_format)
        probe = checkpoint.find("model.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                                "embed_tokens.weight", "decoder.embed_tokens.weight")
        self.dtype = resolve_dtype(config.dtype, self.device, checkpoint.dtype_of(probe) if probe else None)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype, self.device)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer or self.source.path)
        if config.trust_remote_code:
            logger.warning("trust_remote_code=True changes nothing: helios serves its built-in architectures and "
                           "never runs code from a checkpoint")

        if share_weights is not None:
            self._check_shareable(share_weights)
            reader = weight_reader(hf, checkpoint, self.dtype, self.device, config.quantization)
            self.model = share_weights.model.shared(reader, num_layers)
            self.layers_read = max(0, num_layers - share_weights.model.loaded_layers)
        else:
            self.model = load_model(hf, checkpoint, num_layers, self.max_model_len, self.dtype, self.device,
                                    PagedAttentionOps(self.device), config.quantization)
            self.layers_read = num_layers  # decoder layers read from the checkpoint
        self.checkpoint = checkpoint
        self.max_num_batched_tokens = config.max_num_batched_tokens or max(2048, self.max_model_len)
        self.early_exit = config.early_exit
        self.exit_policy = self._exit_policy(num_layers)
        self._build_kv_and_runner()
        self.eos_token_ids = self._eos_ids()
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.runner.stop_ids = frozenset(self.eos_token_ids)
        self.probes = None  # ProbeLog while profiling (set_probes): every exit layer evaluated on every token
        self.lock = threading.RLock()
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self._stepping = False
        self._pending_aborts: list[str] = []
        self._request_ids = itertools.count() if request_ids is None else request_ids
        self.num_generated_tokens = 0
        self.exit_histogram: Counter[int] = Counter()  # 1-based exit layer -> generated tokens
        self.num_breaches = 0

    def _check_shareable(self, other: LLMEngine) -> None:
        mine = (self.source.path, self.dtype, self.device, self.config.quantization, self.config.load_format,
                self.max_model_len)
        theirs = (other.source.path, other.dtype, other.device, other.config.quantization, other.config.load_format,
                  other.max_model_len)
        if mine != theirs:
            raise ValueError(f"cannot share weights: (model, dtype, device, quantization, load_format, max_model_len) "
                             f"differ: {mine} vs {theirs}")

    def _build_kv_and_runner(self) -> None:
        """Sizes the KV pool for the loaded layers and builds the runner and scheduler over it."""
        config, num_layers = self.config, self.model.loaded_layers
        self.kv_bytes_per_token = kv_bytes_per_token(num_layers, self.model.num_kv_heads, self.model.head_dim,
                                                     self.kv_cache_dtype)
        num_blocks, self.kv_sizing = kv_pool_blocks(
            device=self.device, weight_bytes=self.model.weight_bytes, activation_bytes=self._activation_bytes(),
            bytes_per_token=self.kv_bytes_per_token, block_size=config.block_size,
            kv_cache_blocks=config.kv_cache_blocks, memory_budget=config.memory_budget,
            gpu_memory_utilization=config.gpu_memory_utilization, loaded_layers=num_layers)
        blocks_per_max_seq = -(-self.max_model_len // config.block_size)
        if num_blocks < blocks_per_max_seq:
            if config.max_model_len is not None:
                raise ValueError(
                    f"the KV pool ({num_blocks} blocks of {config.block_size} tokens) cannot hold one sequence of "
                    f"max_model_len={self.max_model_len}: raise memory_budget/kv_cache_blocks or lower max_model_len")
            if num_blocks < 1:
                raise ValueError("memory_budget leaves no room for the KV cache after the weights")
            self.max_model_len = num_blocks * config.block_size
            logger.warning("max_model_len lowered to %d to fit the KV pool", self.max_model_len)
        self.kv_cache = KVCache(num_layers, num_blocks, config.block_size, self.model.num_kv_heads,
                                self.model.head_dim, self.kv_cache_dtype, self.device)
        self.runner = ModelRunner(self.model, self.kv_cache, self.device, seed=config.seed,
                                  exit_policy=self.exit_policy)
        self.scheduler = Scheduler(self.kv_cache.allocator, config.max_num_seqs, self.max_num_batched_tokens,
                                   prefix_caching=config.enable_prefix_caching)

    def _exit_policy(self, num_layers: int):
        """Loads trained exit heads (ExitConfig.heads, else the model's helios_exits/ folder) and resolves the
        exit layers and thresholds; None without early exit."""
        self.exit_heads_dir = None
        if self.early_exit is None:
            return None
        heads_dir = self.early_exit.heads or find_model_heads(self.source.path)
        heads = None
        if heads_dir is not None:
            heads = ExitHeads.load(heads_dir, dtype=self.dtype, device=self.device)
            heads.check_model(self.model, heads_dir)
            self.model.exit_heads = heads
        self.exit_heads_dir = heads_dir
        return self.early_exit.policy(num_layers, heads)

    def _activation_bytes(self) -> int:
        m, size = self.model, torch.empty((), dtype=self.dtype).element_size()
        per_token = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim + 6 * m.hidden_size
        mlp = getattr(self.source.config, "intermediate_size", None) or getattr(self.source.config, "ffn_dim", 0)
        logits = self.config.max_num_seqs * m.vocab_size * 4
        return self.max_num_batched_tokens * (per_token + 3 * mlp) * size + logits

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.source.config, getattr(self.tokenizer, "eos_token_id", None)):
            value = getattr(source, "eos_token_id", source) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    # ---- requests -----------------------------------------------------------------------------
    # Public methods hold self.lock: one LLM may be used from several threads (each step advances every request;
    # a caller waits for its own). An abort asked for during a step (a stream closed by the garbage collector
    # inside it, say) is carried out when the step ends.
    def make_request(self, prompt, params: SamplingParams) -> Request:
        """Validates one request and tokenizes it; raises without touching engine state."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        params = params.clone()  # validated again here: attributes may have been changed since construction
        text, token_ids = parse_prompt(prompt, self.tokenizer, self.model.vocab_size)
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt is {len(token_ids)} tokens, longer than max_model_len="
                                     f"{self.max_model_len} allows (it needs room for at least one generated token)")
        if any(t >= self.model.vocab_size for t in params.stop_token_ids or []):
            raise ValueError(f"SamplingParams.stop_token_ids has ids >= vocab size {self.model.vocab_size}")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > self.model.vocab_size:
                raise ValueError(f"SamplingParams.{name} must be <= the vocabulary size {self.model.vocab_size}")
        return Request(str(next(self._request_ids)), text, token_ids, params)

    @locked
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} was added already")
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    @locked
    def abort(self, request_id: str) -> bool:
        """Stops a request: its sequences finish with finish_reason "abort" and give back their KV blocks.
        False when no such request is running (unknown, or already finished)."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        if self._stepping:
            self._pending_aborts.append(request_id)
            return True
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        del self.requests[request_id]
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- what the control plane changes between steps ------------------------------------------------------------
    @locked
    def release(self, request_id: str) -> Request:
        """Takes a request out of this engine unfinished (to carry it to another): its sequences give back their
        KV blocks and keep their tokens."""
        self._check_idle("release")
        request = self.requests.pop(request_id)
        for seq in request.seqs:
            if seq.is_finished:
                continue
            self.kv_cache.allocator.free_sequence(seq.seq_id)
            for queue in (self.scheduler.running, self.scheduler.waiting):
                if seq in queue:
                    queue.remove(seq)
            _reset_for_recompute(seq)
        return request

    @locked
    def adopt(self, request: Request) -> None:
        """Continues a request released by an engine of the same tokenizer: its unfinished sequences are
        re-prefilled here (prompt + tokens generated so far) and go on decoding."""
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} is already in this engine")
        self.requests[request.request_id] = request
        for seq in request.seqs:
            if not seq.is_finished:
                _reset_for_recompute(seq)
                self.scheduler.waiting.append(seq)

    @locked
    def set_exit_policy(self, policy: ExitPolicy | None) -> None:
        """Exit layers and thresholds from now on (None: plain decoding); the last loaded layer must be an exit."""
        self._check_idle("set_exit_policy")
        if policy is not None and (policy.layers[-1] != self.model.loaded_layers
                                   or any(not 1 <= x <= self.model.loaded_layers for x in policy.layers)):
            raise ValueError(f"exit layers {list(policy.layers)} must lie in 1..{self.model.loaded_layers} and end at "
                             "the last loaded layer")
        self.exit_policy = policy
        self.runner.set_exit_policy(policy)

    @locked
    def set_probes(self, probes: ProbeLog | None) -> None:
        """Starts (a ProbeLog) or stops (None) profiling: full depth, every probe layer evaluated on every token."""
        self._check_idle("set_probes")
        if probes is not None and any(not 1 <= x < self.model.loaded_layers for x in probes.layers):
            raise ValueError(f"probe layers {list(probes.layers)} must lie in 1..{self.model.loaded_layers - 1}")
        self.runner.probes = probes

    @locked
    def grow(self, depth: int, exit_policy: ExitPolicy | None = None) -> None:
        """Loads layers loaded_layers+1..depth (only those), re-lays the KV pool for `depth` layers and re-prefills
        every unfinished sequence, so its next tokens are those of a depth-`depth` model on the same context.
        If anything fails, the engine keeps serving as it was."""
        self._check_idle("grow")
        model = self.model
        saved_model = (model.loaded_layers, model.layer_bytes, model.weight_bytes, model.num_parameters)
        saved_engine = {name: getattr(self, name) for name in
                        ("kv_bytes_per_token", "kv_sizing", "max_model_len", "kv_cache", "runner", "scheduler",
                         "exit_policy")}
        unfinished = [*self.scheduler.running, *self.scheduler.waiting]
        try:
            model.grow(weight_reader(self.source.config, self.checkpoint, self.dtype, self.device,
                                       self.config.quantization), depth)
            self.exit_policy = exit_policy
            self._build_kv_and_runner()
        except BaseException:
            del model.layers[saved_model[0]:]
            del model.layer_sizes[saved_model[0]:]
            model.loaded_layers, model.layer_bytes, model.weight_bytes, model.num_parameters = saved_model
            for name, value in saved_engine.items():
                setattr(self, name, value)
            raise
        self.runner.stop_ids = frozenset(self.eos_token_ids)
        self.runner.probes = saved_engine["runner"].probes if exit_policy is None else None
        for seq in unfinished:  # the old pool is gone: every sequence recomputes its K/V in the new one
            _reset_for_recompute(seq)
            self.scheduler.waiting.append(seq)

    def _check_idle(self, what: str) -> None:
        if self._stepping:
            raise RuntimeError(f"{what} cannot run inside a step")

    @locked
    def step(self) -> list[Sequence]:
        """Runs one batch; returns the sequences that advanced (each gained exactly one token)."""
        self._stepping = True
        try:
            return self._step()
        finally:
            self._stepping = False
            pending, self._pending_aborts = self._pending_aborts, []
            for request_id in pending:
                self.abort(request_id)

    def _step(self) -> list[Sequence]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        choices = self.runner.step(batch)
        advanced = []
        for item, choice in zip(batch, choices, strict=True):
            seq = item.seq
            seq.token_ids.append(choice.token)
            seq.exit_layers.append(choice.exit_layer)
            seq.confidences.append(choice.confidence)
            if choice.logprobs is not None:
                seq.logprobs.append(choice.logprobs)
            if choice.prompt_logprobs is not None and seq.prompt_logprobs is None:
                seq.prompt_logprobs = choice.prompt_logprobs
            seq.last_breach = choice.breach
            self.exit_histogram[choice.exit_layer] += 1
            self.num_breaches += choice.breach
            self.num_generated_tokens += 1
            self.outputs.check_finished(seq)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                self._forget_if_done(seq.request_id)
            advanced.append(seq)
        return advanced

    def _forget_if_done(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is not None and request.is_finished:
            del self.requests[request_id]

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced float32 logits [len(token_ids), vocab] through the loaded layers (uses free KV blocks)."""
        hidden = self.hidden_states([token_ids], [self.model.loaded_layers])[self.model.loaded_layers]
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def prompt_nats(self, token_ids: list[int]) -> float:
        """-ln p of tokens 1..n-1 of token_ids, each given the tokens before it, summed (teacher forced through the
        loaded layers; DecoderModel.token_nats: no [n, vocab] logits where the fused head applies)."""
        hidden = self.hidden_states([token_ids], [self.model.loaded_layers])[self.model.loaded_layers]
        targets = torch.tensor(token_ids[1:], device=hidden.device)
        return float(self.model.token_nats(hidden[:-1], targets).sum())

    @locked
    @torch.inference_mode()
    def hidden_states(self, windows: list[list[int]], layers: list[int]) -> dict[int, torch.Tensor]:
        """Teacher-forced hidden states after each listed 1-based layer: {layer: [total tokens, d]}, the
        windows' tokens in order. One forward for all windows; needs an idle engine and free KV blocks."""
        if self.has_unfinished():
            raise RuntimeError("hidden_states needs an idle engine")
        if not windows or not all(windows):
            raise ValueError("hidden_states needs at least one window, and no empty window")
        depth = self.model.loaded_layers
        if not layers or any(not 1 <= layer <= depth for layer in layers):
            raise ValueError(f"layers {sorted(layers)} must lie in 1..{depth} (the loaded layers)")
        seqs = [Sequence("score", None, list(w), SamplingParams(max_tokens=1)) for w in windows]
        allocator = self.kv_cache.allocator
        try:
            for seq in seqs:
                if seq.num_tokens > self.max_model_len:
                    raise ValueError(f"a window of {seq.num_tokens} tokens exceeds max_model_len={self.max_model_len}")
                if not allocator.can_hold(seq.seq_id, seq.num_tokens):
                    raise ValueError(f"{sum(s.num_tokens for s in seqs)} tokens do not fit in the free KV blocks")
                allocator.ensure_capacity(seq.seq_id, seq.num_tokens)
            input_ids, positions, meta, _ = self.runner.prepare([ScheduledSeq(s, s.num_tokens) for s in seqs])
            hidden = self.model.embed(input_ids, positions)
            kv_layers = self.kv_cache.layers()
            states = {}
            for i in range(max(layers)):
                hidden = self.model.layer(i, hidden, positions, kv_layers[i], meta)
                if i + 1 in layers:
                    states[i + 1] = hidden
            return states
        finally:
            for seq in seqs:
                allocator.free_sequence(seq.seq_id)

    @locked
    def reset_prefix_cache(self) -> None:
        self.kv_cache.allocator.reset_prefix_cache()

    @locked
    def output(self, request: Request) -> RequestOutput:
        return self.outputs.request_output(request)

    @locked
    def stable_text(self, seq: Sequence) -> str:
        return self.outputs.stable_text(seq)

    @locked
    def stats(self) -> dict:
        kv = self.kv_cache
        blocks_per_seq = -(-self.max_model_len // kv.block_size)
        return {
            "model": self.source.name,
            "model_path": str(self.source.path),
            "architecture": self.model.model_type,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "kv_cache_dtype": str(self.kv_cache_dtype).removeprefix("torch."),
            "total_layers": self.model.total_layers,
            "loaded_layers": self.model.loaded_layers,
            "weight_bytes": self.model.weight_bytes,
            "layer_bytes": self.model.layer_bytes,
            "embedding_bytes": self.model.embedding_bytes,
            "lm_head_bytes": self.model.lm_head_bytes,
            "lm_head_tied": self.model.lm_head_tied,
            "kv_cache_bytes": kv.total_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "block_size": kv.block_size,
            "kv_blocks_total": kv.num_blocks,
            "kv_blocks_free": kv.allocator.num_free,
            "kv_cache_sizing": self.kv_sizing,
            "max_model_len": self.max_model_len,
            "max_concurrent_seqs": min(self.config.max_num_seqs, kv.num_blocks // blocks_per_seq),
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_caching": self.scheduler.prefix_caching,
            "prefix_cache_hit_rate": round(self.scheduler.num_cached_tokens / max(1, self.scheduler.num_prompt_tokens),
                                           4),
            "kv_blocks_cached": kv.allocator.num_cached_blocks,
            "num_generated_tokens": self.num_generated_tokens,
            "attention_backend": self.model.ops.backend,
            "early_exit": None if self.exit_policy is None else {
                "layers": list(self.exit_policy.layers), "confidence": self.exit_policy.confidence,
                "thresholds": self.exit_policy.thresholds,
                "heads": None if self.exit_heads_dir is None else str(self.exit_heads_dir)},
            "exit_histogram": dict(sorted(self.exit_histogram.items())),
            "num_breaches": self.num_breaches,
        }
