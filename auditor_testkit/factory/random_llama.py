"""Seeded random Llama-style state dicts: weights with the right names and shapes, no
training. For discovery tests and benchmarks, where only bytes, headers and distances
matter."""

from __future__ import annotations

import torch


def random_llama(seed: int, *, hidden: int, inter: int, layers: int, vocab: int,
                 std: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    out = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden),
           "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            out[p + f"self_attn.{proj}_proj.weight"] = w(hidden, hidden)
        out[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        out[p + "mlp.up_proj.weight"] = w(inter, hidden)
        out[p + "mlp.down_proj.weight"] = w(hidden, inter)
        out[p + "input_layernorm.weight"] = torch.ones(hidden)
        out[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    return out
