"""Helpers shared by the tests/test_weights_*.py modules: tiny models and raw safetensors bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch


def tiny_llama(*, seed: int = 0, tie: bool = False, vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def raw_safetensors(header: dict, data: bytes, *, length: int | None = None) -> bytes:
    """Bytes of a safetensors file with an arbitrary (possibly lying) header."""
    text = json.dumps(header).encode()
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path
