"""Exit tuning: train one affine adapter per exit layer by self-distillation on unlabeled text.

The base model stays frozen and runs once over the corpus: each forward keeps, for a random subset of the
positions, the hidden state after every exit layer and the final layer's head input (the teacher). Training
then draws Adam batches from all kept positions at random (tokens of one window are near-duplicates as a
batch; shuffled across the corpus they are not) and takes one step for all adapters together. Adapters start
at identity (= the plain logit lens) and are trained through `DecoderModel.exit_head_input`, the same function
the runtime applies, so what is trained is what is served.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from helios.config import EngineConfig
from helios.engine.engine import LLMEngine
from helios.exits.heads import ExitAdapter, ExitHeads, model_fingerprint
from helios.model.source import resolve_model
from helios.tuning.corpus import MIN_WINDOW, batches, take_tokens, token_windows
from helios.tuning.distill import distill, teacher_targets
from helios.tuning.sampled_distill import TopKTeacher, candidates, student_loss, teacher_probs, topk_teacher

FORWARD_TOKENS = 2048  # tokens per frozen forward: large enough for efficient GEMMs, one group of KV blocks
CANDIDATE_VOCAB = 100_000  # distill="auto" trains on candidate tokens above this vocabulary size
SCORE_ROWS = 2048  # held-out positions scored at a time


@dataclass
class TuneConfig:
    layers: list[int]
    max_tokens: int = 200_000  # training tokens per epoch
    eval_tokens: int = 10_000  # held-out tokens (from eval_corpus, else held back from the training files)
    seq_len: int = 256
    batch_tokens: int = 256  # sampled positions per Adam step (more, smaller steps beat fewer, larger ones)
    epochs: int = 1  # passes over the sampled positions (the frozen forward runs once, whatever the count)
    lr: float = 1e-2
    warmup_steps: int = 10
    ce_weight: float = 3.0  # weight of top-1 cross-entropy next to the KL term (0: KL only)
    # share of the training positions kept for the loss (random, shared by all exits): the vocabulary-wide
    # softmax of teacher and students costs more per position than the frozen forward, and neighbouring
    # positions of a window carry much the same signal. Kept states take (exits + 1) * d * 4 bytes a position.
    sample_fraction: float = 0.7
    train_norm: bool = True  # also learn an exit-specific norm weight (starts as the final norm's)
    seed: int = 0
    # "full": KL over the whole vocabulary each step; "candidates": over the batch's teacher top-K tokens plus a
    # sampled tail (helios.tuning.sampled_distill), for large vocabularies; "auto": candidates above 100k tokens
    distill: str = "auto"
    top_k: int = 32
    tail_samples: int = 2048

    def __post_init__(self) -> None:
        if not self.layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers):
            raise ValueError(f"layers must be a non-empty list of layer numbers, got {self.layers!r}")
        self.layers = sorted(set(self.layers))
        for name in ("max_tokens", "eval_tokens", "seq_len", "batch_tokens", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if self.ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0, got {self.ce_weight}")
        if self.distill not in ("auto", "full", "candidates"):
            raise ValueError(f"distill must be 'auto', 'full' or 'candidates', got {self.distill!r}")
        for name in ("top_k", "tail_samples"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(
                    self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")

    def uses_candidates(self, vocab_size: int) -> bool:
        return self.distill == "candidates" or (self.distill == "auto" and vocab_size > CANDIDATE_VOCAB)


def _check_layers(layers: list[int], total: int) -> None:
    bad = [x for x in layers if not 1 <= x < total]
    if bad:
        raise ValueError(f"exit layers {bad} are outside 1..{total - 1} (the model has {total} layers; the last "
                         "one is the teacher)")


def teacher_forcing_engine(model, window_tokens: int) -> LLMEngine:
    """An engine for teacher-forced passes of up to `window_tokens` tokens at a time (float32, no prefix cache);
    `model` is an alias, a path, or an LLM whose engine is used as it is."""
    engine = getattr(model, "engine", None)
    if isinstance(engine, LLMEngine):
        if engine.dtype != torch.float32:
            raise ValueError(f"exit tuning and calibration run in float32; this LLM is {engine.dtype}")
        return engine
    config = resolve_model(model).config
    max_len = min(window_tokens, getattr(config, "max_position_embeddings", None) or window_tokens)
    block_size = 16
    blocks = math.ceil(window_tokens * _blocks_per_token(block_size)) + 1
    return LLMEngine(EngineConfig(model, dtype="float32", enable_prefix_caching=False, block_size=block_size,
                                  kv_cache_blocks=blocks, max_model_len=max_len))


def _blocks_per_token(block_size: int) -> float:
    """KV blocks a group of windows may need per token: a window of n tokens takes at most n/block_size + 1
    blocks, and windows are at least MIN_WINDOW tokens long."""
    return 1 / block_size + 1 / MIN_WINDOW


def forward_groups(engine, windows: list[list[int]], max_tokens: int) -> Iterator[list[list[int]]]:
    """Groups of windows for one teacher-forced forward each: up to max_tokens tokens, fewer when the engine's
    free KV blocks hold less (an LLM the caller passed in)."""
    cache = engine.kv_cache
    fits = int(cache.allocator.num_free / _blocks_per_token(cache.block_size))
    longest = max(len(w) for w in windows)
    if fits < longest:
        raise ValueError(f"the LLM's KV cache has room for {fits} tokens of windows, less than one window of "
                         f"{longest}: give it more kv_cache_blocks or pass the model by name or path")
    return batches(windows, min(max_tokens, fits))


def _parameters(heads: ExitHeads) -> list[torch.Tensor]:
    return [t for a in heads.adapters.values() for t in (a.weight, a.bias, a.norm_weight) if t is not None]


def _trainable_heads(model, config: TuneConfig) -> ExitHeads:
    adapters = {}
    for layer in config.layers:
        adapter = ExitAdapter.identity(model.hidden_size)
        if config.train_norm and model.final_norm is not None and model.final_norm.weight is not None:
            adapter.norm_weight = model.final_norm.weight.detach().float().clone()
        adapters[layer] = adapter
    heads = ExitHeads(model_fingerprint(model), adapters)
    for t in _parameters(heads):
        t.requires_grad_(True)
    return heads


def _split_windows(tokenizer, corpus, eval_corpus, config: TuneConfig):
    """Training windows (max_tokens tokens, whether or not there is an eval corpus) and held-out windows. Without
    eval_corpus, eval_tokens more are read from the training files and the first of the shuffled windows are held
    back (never trained on)."""
    slack = MIN_WINDOW * len(corpus)  # token_windows drops each file's last piece when it is shorter than that
    if eval_corpus:
        train = token_windows(tokenizer, corpus, config.max_tokens + slack, config.seq_len, config.seed)
        held = token_windows(tokenizer, eval_corpus, config.eval_tokens, config.seq_len, config.seed + 1)
    else:
        windows = token_windows(tokenizer, corpus, config.max_tokens + config.eval_tokens + slack, config.seq_len,
                                config.seed)
        held, train = take_tokens(windows, config.eval_tokens)
    train, _ = take_tokens(train, config.max_tokens)
    return train, held


@dataclass
class SampledStates:
    """What the frozen model gives training for a set of positions: each exit's hidden state and the final
    layer's head input (the teacher's), and for candidate distillation the teacher's top-K and log-normalizer.
    Computed once; rows are positions."""

    exits: dict[int, torch.Tensor]  # exit layer -> [n, d]
    final: torch.Tensor  # [n, d]
    teacher: TopKTeacher | None = None

    def __len__(self) -> int:
        return self.final.shape[0]


def _sample_rows(n: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    if fraction >= 1:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[: max(1, round(n * fraction))].sort().values


def sample_states(engine, windows: list[list[int]], layers: list[int], fraction: float, generator: torch.Generator,
                  desc: str, progress: bool, teacher_top_k: int | None = None) -> SampledStates:
    """Runs the frozen model over `windows` and keeps a random `fraction` of the positions (with teacher_top_k,
    also the teacher's top-K tokens and log-normalizer of each kept position)."""
    m = engine.model
    final = m.total_layers
    kept: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    finals, teachers = [], []
    with tqdm(total=sum(len(w) for w in windows), unit="tok", desc=desc, disable=not progress) as bar:
        for group in forward_groups(engine, windows, FORWARD_TOKENS):
            states = engine.hidden_states(group, layers + [final])
            rows = _sample_rows(states[final].shape[0], fraction, generator).to(states[final].device)
            # indexing copies out of the inference-mode hidden states into tensors autograd may use
            finals.append(m.head_input(states[final][rows]))
            if teacher_top_k is not None:
                teachers.append(topk_teacher(m.head.logits, finals[-1], teacher_top_k))
            for layer in layers:
                kept[layer].append(states[layer][rows])
            bar.update(sum(len(w) for w in group))
    teacher = None
    if teachers:
        teacher = TopKTeacher(torch.cat([t.top for t in teachers]), torch.cat([t.lse for t in teachers]))
    return SampledStates({layer: torch.cat(v) for layer, v in kept.items()}, torch.cat(finals), teacher)


@torch.no_grad()
def score(model, held: SampledStates) -> dict[int, dict[str, float]]:
    """Per exit: top-1 agreement with the final layer and mean KL(final ‖ exit) in nats."""
    head = model.lm_head.float()
    agree = dict.fromkeys(held.exits, 0)
    kl = dict.fromkeys(held.exits, 0.0)
    for start in range(0, len(held), SCORE_ROWS):
        rows = slice(start, start + SCORE_ROWS)
        teacher = teacher_targets(held.final[rows], head)
        for layer, states in held.exits.items():
            r = distill(model.exit_head_input(states[rows], layer), head, teacher, want_grad=False)
            agree[layer] += r.agree
            kl[layer] += r.kl
    n = len(held)
    return {layer: {"agreement": round(agree[layer] / n, 4), "kl": round(kl[layer] / n, 4)} for layer in held.exits}


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup (Adam's first steps are sign-like: at full rate they would shake the identity map), then
    cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def tune_exits(model, corpus: list[str | Path], layers: list[int], out: str | Path | None = None, *,
               eval_corpus: list[str | Path] | None = None, progress: bool = True, **options) -> ExitHeads:
    """Trains exit adapters for `layers` of `model` (an alias, path or LLM) on the text files `corpus` and
    returns them as ExitHeads (also saved to `out` when given). options: the fields of TuneConfig."""
    config = TuneConfig(layers=list(layers), **options)
    started = time.perf_counter()
    engine = teacher_forcing_engine(model, max(FORWARD_TOKENS, config.seq_len))
    m = engine.model
    if m.loaded_layers != m.total_layers:
        raise ValueError(f"exit tuning needs the whole model (the final layer is the teacher): {m.loaded_layers} "
                         f"of {m.total_layers} layers are loaded")
    _check_layers(config.layers, m.total_layers)
    if config.seq_len > engine.max_model_len:
        raise ValueError(f"seq_len={config.seq_len} exceeds the model's max_model_len={engine.max_model_len}")
    train, held = _split_windows(engine.tokenizer, corpus, eval_corpus, config)
    if not held:
        raise ValueError("no held-out text: pass eval_corpus or more training text")

    generator = torch.Generator().manual_seed(config.seed)
    held_states = sample_states(engine, held, config.layers, 1.0, generator, "held-out states", progress)
    candidate_mode = config.uses_candidates(m.vocab_size)
    train_states = sample_states(engine, train, config.layers, config.sample_fraction, generator,
                                 "hidden states", progress, config.top_k if candidate_mode else None)
    heads = _trainable_heads(m, config)
    previous, m.exit_heads = m.exit_heads, heads
    try:
        before = score(m, held_states)
        losses = _train(m, heads, train_states, config, generator, progress)
        after = score(m, held_states)
    finally:
        m.exit_heads = previous
    for t in _parameters(heads):
        t.requires_grad_(False)

    train_tokens = sum(len(w) for w in train)
    heads.info = {
        "training": {"corpus": [str(p) for p in corpus], "tokens": train_tokens, "epochs": config.epochs,
                     "seq_len": config.seq_len, "batch_tokens": config.batch_tokens, "lr": config.lr,
                     "ce_weight": config.ce_weight, "sample_fraction": config.sample_fraction,
                     "sampled_positions": len(train_states),
                     "distill": "candidates" if candidate_mode else "full",
                     **({"top_k": config.top_k, "tail_samples": config.tail_samples} if candidate_mode else {}),
                     "train_norm": config.train_norm, "seed": config.seed,
                     "final_loss": {str(k): v for k, v in losses.items()},
                     "seconds": round(time.perf_counter() - started, 1)},
        "held_out": {"corpus": [str(p) for p in (eval_corpus or corpus)], "tokens": len(held_states),
                     "separate_files": bool(eval_corpus),
                     "per_exit": {str(layer): {"agreement_before": before[layer]["agreement"],
                                               "agreement_after": after[layer]["agreement"],
                                               "kl_before": before[layer]["kl"], "kl_after": after[layer]["kl"]}
                                  for layer in config.layers}},
    }
    if out is not None:
        heads.save(out)
    return heads


def _train(model, heads: ExitHeads, states: SampledStates, config: TuneConfig, generator: torch.Generator,
           progress: bool) -> dict[int, float]:
    """Adam over all adapters on batches drawn at random from all sampled positions; returns each exit's mean
    training loss over the last tenth of the steps."""
    head = model.lm_head.float()
    optimizer = torch.optim.Adam(_parameters(heads), lr=config.lr)
    n = len(states)
    steps_per_epoch = -(-n // config.batch_tokens)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, total_steps, min(config.warmup_steps, max(1, total_steps // 5))))
    history: dict[int, list[float]] = {layer: [] for layer in config.layers}
    with tqdm(total=n * config.epochs, unit="tok", desc="tuning exits", disable=not progress) as bar:
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=generator).to(states.final.device)
            for start in range(0, n, config.batch_tokens):
                rows = order[start:start + config.batch_tokens]
                optimizer.zero_grad(set_to_none=True)
                if states.teacher is None:
                    _full_vocab_step(model, head, states, rows, config, history)
                else:
                    _candidate_step(model, head, states, rows, config, generator, history)
                optimizer.step()
                scheduler.step()
                bar.update(len(rows))
                bar.set_postfix({f"loss@{layer}": f"{history[layer][-1]:.3f}" for layer in config.layers})
    tail = max(1, total_steps // 10)
    return {layer: round(sum(v[-tail:]) / len(v[-tail:]), 4) for layer, v in history.items()}


def _full_vocab_step(model, head: torch.Tensor, states: SampledStates, rows: torch.Tensor, config: TuneConfig,
                     history: dict[int, list[float]]) -> None:
    """Gradients of KL + CE over the whole vocabulary, the LM head's part by hand (helios.tuning.distill)."""
    teacher = teacher_targets(states.final[rows], head)
    for layer in config.layers:
        x = model.exit_head_input(states.exits[layer][rows], layer)
        result = distill(x.detach(), head, teacher, config.ce_weight)
        x.backward(result.grad)
        history[layer].append((result.kl + config.ce_weight * result.ce) / len(rows))


def _candidate_step(model, head: torch.Tensor, states: SampledStates, rows: torch.Tensor, config: TuneConfig,
                    generator: torch.Generator, history: dict[int, list[float]]) -> None:
    """Gradients of KL + CE over the batch's candidate tokens and a sampled tail (helios.tuning.sampled_distill)."""
    cand = candidates(states.teacher.top[rows], head, config.tail_samples, generator)
    p, p_tail = teacher_probs(states.final[rows], states.teacher.lse[rows], cand)
    for layer in config.layers:
        loss, stats = student_loss(model.exit_head_input(states.exits[layer][rows], layer), p, p_tail, cand,
                                   config.ce_weight)
        loss.backward()
        history[layer].append((stats["kl"] + config.ce_weight * stats["ce"]) / len(rows))
