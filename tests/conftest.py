"""Shared fixtures: tiny random checkpoints made with transformers, saved and loaded back through helios."""

from __future__ import annotations

import os
from pathlib import Path

# helios first, before torch: it sets OpenMP's passive wait policy (threads sleep rather than spin, which keeps the
# suite fast on a loaded machine) and, without a GPU, TRITON_INTERPRET=1 before transformers can load triton.
import helios  # noqa: F401

# isort: split
import pytest
import torch

# With a GPU the Triton kernels are compiled, and the interpreter-only tests skip themselves.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                             reason="no CUDA device: bench/device_check.py runs the cuda cases on a GPU machine")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[NO_CUDA, pytest.mark.gpu])]


@pytest.fixture(scope="session", params=DEVICES)
def device(request) -> torch.device:
    """Every device present: cpu always, cuda when torch sees one (skipped with a reason otherwise)."""
    return torch.device(request.param)


@pytest.fixture(scope="session", autouse=True)
def _auto_device_is_cpu():
    """device="auto" means the CPU in tests, on every machine: a test that does not take the `device` fixture
    means the same on a GPU machine as in CI, and one that does passes its device explicitly."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("helios.utils.device.auto_device", lambda: torch.device("cpu"))
        yield


def stories260k_path() -> Path | None:
    """The stories260k checkpoint (a tiny real Llama): HELIOS_STORIES260K, else $HELIOS_SHARED/models/stories260k
    (HELIOS_SHARED defaults to a folder named shared beside the repository), else None."""
    shared = Path(os.environ.get("HELIOS_SHARED") or Path(__file__).resolve().parent.parent.parent / "shared")
    for candidate in (os.environ.get("HELIOS_STORIES260K"), shared / "models" / "stories260k"):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    return None


PROMPTS = [
    "The quick brown fox", "Once upon a time there was", "def add(a, b):", "Water boils at",
    "In 1492 Columbus", "She sells sea shells", "A B C D E F", "Numbers: 1 2 3 4 5",
]


def make_tokenizer(texts: list[str] | None = None, vocab_size: int = 300):
    """A small byte-level BPE tokenizer trained in memory, so any text tokenizes (other texts: another vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or [" ".join(PROMPTS) * 4, "the of and to in is was for on that with as"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _configs():
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    return {
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=False),
        "llama_tied": lambda: LlamaConfig(**common, tie_word_embeddings=True),
        "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=False),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "opt": lambda: OPTConfig(vocab_size=300, hidden_size=48, ffn_dim=80, num_hidden_layers=4,
                                 num_attention_heads=6, max_position_embeddings=256, word_embed_proj_dim=48,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0, init_std=0.1),
        # OPT-350m style: post-norm, no final norm, project_in/out between 32-d embeddings and 48-d layers
        "opt_postnorm_proj": lambda: OPTConfig(vocab_size=300, hidden_size=48, ffn_dim=80, num_hidden_layers=4,
                                               num_attention_heads=6, max_position_embeddings=256,
                                               word_embed_proj_dim=32, do_layer_norm_before=False,
                                               bos_token_id=1, eos_token_id=2, pad_token_id=0, init_std=0.1),
    }


ARCHS = list(_configs())


def build_checkpoint(kind: str, directory: Path, seed: int = 0, logit_scale: float = 1.0) -> Path:
    """logit_scale multiplies the final norm's weight (and bias): random tiny models are otherwise almost
    uniform at every layer (max prob ~0.02), which no exit threshold can tell apart."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[kind]()
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random-but-peaked logits: ties between float paths would make greedy flaky
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
            elif "norm" in name or name.endswith("bias"):
                p.normal_(0, 0.05)
        for name, p in model.named_parameters():
            if name in ("model.norm.weight", "model.decoder.final_layer_norm.weight",
                        "model.decoder.final_layer_norm.bias"):
                p.mul_(logit_scale)
    model.save_pretrained(directory, safe_serialization=True)
    make_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {kind: build_checkpoint(kind, root / kind) for kind in ARCHS}


@pytest.fixture(scope="session")
def peaked_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints whose exits spread over confidences (median max prob 0.5-0.85 per layer)."""
    root = tmp_path_factory.mktemp("peaked")
    kinds = ("llama", "llama_tied", "qwen2", "opt")
    return {kind: build_checkpoint(kind, root / kind, logit_scale=8.0) for kind in kinds}


def hf_model(path: Path, num_layers: int | None = None):
    """The transformers oracle, optionally cut to its first num_layers layers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if num_layers is not None:
        decoder = model.model.decoder if model.config.model_type == "opt" else model.model
        decoder.layers = decoder.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
    model.generation_config.eos_token_id = None  # random models: generate the full length on both sides
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(model, token_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, min_new_tokens=max_new_tokens)
    return out[0, len(token_ids):].tolist()


def greedy_agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Fraction of generated tokens equal to the reference's up to each sequence's first divergence."""
    same = 0
    for a, b in zip(got, want, strict=True):
        same += next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return same / sum(len(b) for b in want)


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()
