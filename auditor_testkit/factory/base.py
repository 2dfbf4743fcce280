"""Tiny Llama- or GPT-2-style base models, "pretrained" for a few seconds on the mixture.

``make_base(seed=..., size="tiny", arch="llama"|"gpt2")`` returns a real (if tiny) causal
LM and the shared tokenizer. Bases are cached per process by (arch, seed, size, steps): a
second call returns a fresh copy of the same weights without retraining.

The GPT-2 variant exists because real Hub checkpoints are not all Llama-shaped: it stores
``Conv1D`` weights transposed (``[in, out]``), fuses q/k/v into ``c_attn``, uses learned
absolute positions and LayerNorm biases, and ties ``lm_head`` to ``transformer.wte``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from auditor_testkit.factory.tasks import pretraining_texts
from auditor_testkit.factory.tokenizer import build_tokenizer, vocab_size
from auditor_testkit.factory.train import encode, train_examples

Size = Literal["tiny", "small"]
Arch = Literal["llama", "gpt2"]
ARCHS: tuple[str, ...] = ("llama", "gpt2")


@dataclass(frozen=True)
class SizeSpec:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    pretrain_steps: int


# hidden 64 and 4 heads (head_dim 16) for every size; "small" is deeper and wider in the MLP.
SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(hidden=64, intermediate=128, layers=2, heads=4, pretrain_steps=250),
    "small": SizeSpec(hidden=64, intermediate=256, layers=4, heads=4, pretrain_steps=300),
}

_CACHE: dict[tuple[str, int, str, int], dict[str, torch.Tensor]] = {}


def llama_config(*, size: Size = "tiny") -> LlamaConfig:
    """The ``LlamaConfig`` of a factory model: untied embeddings, no GQA (kv heads ==
    heads), so per-head disguises and per-tensor analysis stay simple."""
    spec = SIZES[size]
    tok = build_tokenizer()
    return LlamaConfig(
        vocab_size=vocab_size(),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.05,
        rms_norm_eps=1e-6,
    )


def gpt2_config(*, size: Size = "tiny") -> GPT2Config:
    """The ``GPT2Config`` of a factory GPT-2 model: same width, depth and heads as the Llama
    of that size (n_embd 64, 4 heads), MLP width ``n_inner``, and tied input/output
    embeddings as in real GPT-2 checkpoints (the tied-head handling is what it exercises)."""
    spec = SIZES[size]
    tok = build_tokenizer()
    return GPT2Config(
        vocab_size=vocab_size(),
        n_embd=spec.hidden,
        n_inner=spec.intermediate,
        n_layer=spec.layers,
        n_head=spec.heads,
        n_positions=64,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.05,
        # No dropout: the factory's short runs should be deterministic per seed, like the
        # Llama models (which have none).
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def model_config(*, arch: Arch = "llama", size: Size = "tiny") -> PretrainedConfig:
    """The config of a factory model of ``arch`` and ``size``."""
    if arch == "llama":
        return llama_config(size=size)
    if arch == "gpt2":
        return gpt2_config(size=size)
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")


def new_model(config: PretrainedConfig, *, seed: int) -> PreTrainedModel:
    """A randomly initialised model for ``config`` (Llama or GPT-2); the global RNG is left
    untouched."""
    cls: type[PreTrainedModel]
    if isinstance(config, LlamaConfig):
        cls = LlamaForCausalLM
    elif isinstance(config, GPT2Config):
        cls = GPT2LMHeadModel
    else:
        raise ValueError(f"no factory model class for {type(config).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.eval()
    return model


def make_base(
    *, seed: int = 0, size: Size = "tiny", steps: int | None = None, arch: Arch = "llama"
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A base model pretrained ``steps`` AdamW steps (default per size) on the mixture.

    Returns ``(model, tokenizer)``; the model is in eval mode, float32. Two seeds give
    independently trained (unrelated) bases. ``arch="gpt2"`` gives a ``GPT2LMHeadModel``
    trained with the same data, schedule and tokenizer as the Llama base.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    n_steps = SIZES[size].pretrain_steps if steps is None else steps
    tokenizer = build_tokenizer()
    model = new_model(model_config(arch=arch, size=size), seed=seed)
    key = (arch, seed, size, n_steps)
    if key in _CACHE:
        model.load_state_dict(_CACHE[key])
        return model, tokenizer
    texts = pretraining_texts(n=max(2000, n_steps * 24), seed=seed)
    data = encode(tokenizer, [("", t) for t in texts], completion_only=False)
    train_examples(
        model, data, pad_id=tokenizer.pad_token_id, steps=n_steps, lr=5e-3, seed=seed,
        batch_size=24, weight_decay=0.01,
    )
    _CACHE[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, tokenizer


def model_from_state_dict(
    config: PretrainedConfig, state_dict: dict[str, torch.Tensor]
) -> PreTrainedModel:
    """A float32 model holding ``state_dict`` (e.g. a merge result) for evaluation.

    A tied model (GPT-2) may come without ``lm_head.weight`` (as saved on the Hub): the
    head is the embedding then, so loading non-strictly on that one name is exact.
    """
    model = new_model(config, seed=0)
    sd = {k: v.to(torch.float32) for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied_ok = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied_ok:
        raise RuntimeError(
            f"state dict does not fit {type(model).__name__}: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return model


__all__ = [
    "ARCHS",
    "SIZES",
    "Arch",
    "Size",
    "gpt2_config",
    "llama_config",
    "make_base",
    "model_config",
    "model_from_state_dict",
    "new_model",
]
