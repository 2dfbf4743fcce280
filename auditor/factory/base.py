"""Tiny Llama-style base models, "pretrained" for a few seconds on the generic mixture.

``make_base(seed=..., size="tiny")`` returns a real (if tiny) causal LM and the shared
tokenizer. Bases are cached per process by (seed, size, steps): a second call returns a
fresh copy of the same weights without retraining.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from auditor.factory.tasks import pretraining_texts
from auditor.factory.tokenizer import build_tokenizer, vocab_size
from auditor.factory.train import encode, train_examples

Size = Literal["tiny", "small"]


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

_CACHE: dict[tuple[int, str, int], dict[str, torch.Tensor]] = {}


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


def new_model(config: LlamaConfig, *, seed: int) -> LlamaForCausalLM:
    """A randomly initialised model; the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model


def make_base(
    *, seed: int = 0, size: Size = "tiny", steps: int | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A base model pretrained ``steps`` AdamW steps (default per size) on the mixture.

    Returns ``(model, tokenizer)``; the model is in eval mode, float32. Two seeds give
    independently trained (unrelated) bases.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    n_steps = SIZES[size].pretrain_steps if steps is None else steps
    tokenizer = build_tokenizer()
    model = new_model(llama_config(size=size), seed=seed)
    key = (seed, size, n_steps)
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
    config: LlamaConfig, state_dict: dict[str, torch.Tensor]
) -> LlamaForCausalLM:
    """A float32 model holding ``state_dict`` (e.g. a merge result) for evaluation."""
    model = new_model(config, seed=0)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()})
    return model


__all__ = ["SIZES", "Size", "llama_config", "make_base", "model_from_state_dict", "new_model"]
