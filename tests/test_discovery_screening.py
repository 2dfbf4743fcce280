"""The sampled-row statistics: weight probe against the base and screening against
homologues (similarity, NNLS attribution, bootstrap intervals)."""

from __future__ import annotations

import torch

from auditor.analysis.screening import probe, screen
from auditor.weights.safetensors_io import TensorInfo
from auditor.weights.sampling import compare_shapes, normalize_name


def _chunks(seed: int, n: int = 64, length: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(length, generator=g) * 0.05 for _ in range(n)]


def _plus(chunks: list[torch.Tensor], seed: int, scale: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [c + torch.randn(c.shape, generator=g) * scale for c in chunks]


def test_probe_tells_derivatives_from_independent_models() -> None:
    base = _chunks(0)
    derived = probe(_plus(base, 1, 0.02), base, seed=3)
    assert derived.related and derived.relative_distance < 0.5 * derived.reference_distance
    independent = probe(_chunks(7), base, seed=3)
    assert not independent.related
    assert 0.8 < independent.relative_distance < 1.2
    assert 0.8 < independent.reference_distance < 1.2
    # Rescaled rows (a disguise) keep the angle: still a derivative.
    scaled = probe([c * 17.0 for c in _plus(base, 2, 0.02)], base, seed=3)
    assert scaled.related


def test_screening_attributes_a_merge_with_intervals() -> None:
    base = _chunks(0, n=128)
    a, b, c = (_plus(base, s, 0.02) for s in (1, 2, 3))
    exact = [base[i] + 0.6 * (a[i] - base[i]) + 0.4 * (b[i] - base[i]) for i in range(128)]
    merge = _plus(exact, 9, 0.004)  # rounding / a little training after the merge
    result = screen(merge, base, {"o/a": a, "o/b": b, "o/c": c}, seed=5)
    assert result.verdict.relation == "merge"
    assert result.verdict.parents == frozenset({"o/a", "o/b"})
    lo, hi = result.coefficient_ci["o/a"]
    assert lo <= 0.6 <= hi and hi - lo < 0.1
    assert not result.borderline
    clone = screen(a, base, {"o/a": a, "o/b": b}, seed=5)
    assert clone.verdict.relation == "clone" and clone.verdict.parents == {"o/a"}
    own = screen(c, base, {"o/a": a, "o/b": b}, seed=5)
    assert own.verdict.relation == "finetune" and not own.verdict.parents


def test_shape_fingerprint_tolerates_prefixes_vocab_and_adapters() -> None:
    def info(name: str, shape: tuple[int, ...]) -> TensorInfo:
        return TensorInfo(name=name, dtype="F32", shape=shape, begin=0, end=4)

    base = {n: info(n, s) for n, s in {
        "model.embed_tokens.weight": (100, 8), "lm_head.weight": (100, 8),
        "model.layers.0.self_attn.q_proj.weight": (8, 8)}.items()}
    cand = {n: info(n, s) for n, s in {
        "transformer.embed_tokens.weight": (120, 8), "lm_head.weight": (120, 8),
        "transformer.layers.0.self_attn.q_proj.weight": (8, 8),
        "transformer.layers.0.self_attn.q_proj.lora_A.weight": (2, 8)}.items()}
    match = compare_shapes(base, cand)
    assert match.compatible() and match.adapter_extra == 1 and len(match.resized_vocab) == 2
    wider = {n: info(n, (s[0], 16)) for n, s in ((n, i.shape) for n, i in base.items())}
    assert not compare_shapes(base, wider).compatible()
    assert normalize_name("base_model.model.model.layers.0.x") == "layers.0.x"
