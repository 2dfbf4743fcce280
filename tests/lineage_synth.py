"""Synthetic task vectors and merge algebra for the lineage tests (no training)."""

from __future__ import annotations

import torch

from auditor.analysis.fingerprint import Fingerprint, compute_fingerprint, fingerprint_weights
from auditor.weights.dict_sources import DictDeltaSource, DictTensorSource

Tensors = dict[str, torch.Tensor]

SHAPES = {
    "model.embed_tokens.weight": (96, 32),
    "model.norm.weight": (32,),
    "lm_head.weight": (96, 32),
}
for _i in range(3):
    for _p, _s in {
        "self_attn.q_proj.weight": (32, 32),
        "self_attn.k_proj.weight": (32, 32),
        "self_attn.v_proj.weight": (32, 32),
        "self_attn.o_proj.weight": (32, 32),
        "mlp.gate_proj.weight": (64, 32),
        "mlp.up_proj.weight": (64, 32),
        "mlp.down_proj.weight": (32, 64),
        "input_layernorm.weight": (32,),
    }.items():
        SHAPES[f"model.layers.{_i}.{_p}"] = _s


def base_weights(seed: int = 0) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 0.5 for n, s in SHAPES.items()}


def task_vector(seed: int, scale: float = 0.05) -> Tensors:
    """An independent fine-tune's update: random, so near-orthogonal to any other."""
    g = torch.Generator().manual_seed(1000 + seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}


def combine(taus: list[Tensors], coefs: list[float]) -> Tensors:
    return {n: sum(c * t[n] for c, t in zip(coefs, taus, strict=True)) for n in SHAPES}


def add(a: Tensors, b: Tensors, scale: float = 1.0) -> Tensors:
    return {n: a[n] + scale * b[n] for n in a}


def fp(tv: Tensors, *, sample_size: int = 100_000) -> Fingerprint:
    return compute_fingerprint(DictDeltaSource(tv), sample_size=sample_size)


def fp_weights(w: Tensors, *, sample_size: int = 100_000) -> Fingerprint:
    return fingerprint_weights(DictTensorSource(w), sample_size=sample_size)

