"""Fingerprint sampling, serialization and error bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from auditor.analysis.fingerprint import (
    Fingerprint,
    compute_fingerprint,
    exact_inner_products,
    layer_group,
    sample_indices,
)
from auditor.analysis.similarity import cosine_report
from auditor.errors import AnalysisError
from auditor.weights.dict_sources import DictDeltaSource


def _big(seed: int, n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(256, 128, generator=g) for i in range(n)
    }


def test_same_coordinates_for_every_model() -> None:
    a = sample_indices("model.layers.0.mlp.up_proj.weight", (256, 128), 512)
    b = sample_indices("model.layers.0.mlp.up_proj.weight", (256, 128), 512)
    c = sample_indices("model.layers.1.mlp.up_proj.weight", (256, 128), 512)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(np.unique(a)) == 512 and a.max() < 256 * 128


def test_round_trip_and_exact_stats() -> None:
    tv = _big(0)
    tv["model.layers.0.mlp.up_proj.weight"][:10] = 0.0
    fp = compute_fingerprint(DictDeltaSource(tv), sample_size=1000)
    back = Fingerprint.from_bytes(fp.to_bytes())
    assert back.keys() == fp.keys() and back.sample_size == 1000
    for k in fp.keys():
        assert np.array_equal(back.tensors[k].sample, fp.tensors[k].sample)
        assert back.tensors[k].sq_norm == pytest.approx(float((tv[k] ** 2).sum()), rel=1e-6)
    assert back.zero_fraction == pytest.approx(10 * 128 / (4 * 256 * 128))
    assert back.tensors["model.layers.0.mlp.up_proj.weight"].group == "layer.0"


def test_from_bytes_rejects_garbage() -> None:
    with pytest.raises(AnalysisError):
        Fingerprint.from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")


def test_error_bound_covers_sampled_cosine() -> None:
    a, noise = _big(1), _big(2)
    c_true = 0.3
    b = {k: c_true * a[k] + math.sqrt(1 - c_true**2) * noise[k] for k in a}
    fa = compute_fingerprint(DictDeltaSource(a), sample_size=256)
    fb = compute_fingerprint(DictDeltaSource(b), sample_size=256)
    exact = sum(exact_inner_products(DictDeltaSource(a), DictDeltaSource(b)).values())
    c_exact = exact / math.sqrt(fa.sq_norm * fb.sq_norm)
    rep = cosine_report(fa, fb)
    assert 0 < fa.error_bound < 0.05
    assert abs(rep.cosine - c_exact) < 4 * fa.cosine_error(c_exact)
    whole = compute_fingerprint(DictDeltaSource(a), sample_size=10**6)
    assert whole.is_exact and whole.error_bound == 0.0


def test_groups() -> None:
    assert layer_group("model.layers.12.self_attn.q_proj.weight") == "layer.12"
    assert layer_group("model.embed_tokens.weight") == "embed"
    assert layer_group("lm_head.weight") == "lm_head"
    assert layer_group("model.norm.weight") == "norm"
