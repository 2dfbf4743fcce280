"""Lineage analysis on synthetic task vectors merged with the factory's merge algebra."""

from __future__ import annotations

import pytest
import torch

from auditor.analysis.lineage import analyze_lineage, subject_is_derivative_of_candidate
from auditor_testkit.factory import merge as mk
from tests.lineage_synth import SHAPES, add, base_weights, fp, fp_weights, task_vector

N_FT = 8


@pytest.fixture(scope="module")
def zoo() -> dict:
    base = base_weights()
    taus = [task_vector(i) for i in range(N_FT)]
    models = [add(base, t) for t in taus]
    cands = {f"ft{i}": fp(t) for i, t in enumerate(taus)}
    return {
        "base": base,
        "taus": taus,
        "models": models,
        "cands": cands,
        "base_fp": fp_weights(base),
    }


def _run(zoo: dict, merged: dict[str, torch.Tensor], *, exclude: str | None = None):
    tv = {n: merged[n] - zoo["base"][n] for n in SHAPES}
    cands = {k: v for k, v in zoo["cands"].items() if k != exclude}
    return analyze_lineage(fp(tv), cands, base_fingerprint=zoo["base_fp"], declared_parents=["ft0"])


def _parents(res) -> dict[str, float]:
    return {e.repo_id: e.coefficient for e in res.entries if e.relation == "merge_parent"}


def test_linear_and_task_arithmetic(zoo: dict) -> None:
    m = zoo["models"]
    res = _run(zoo, mk.linear_merge([m[0], m[1]], weights=[0.65, 0.35]).state_dict)
    assert _parents(res) == pytest.approx({"ft0": 0.65, "ft1": 0.35}, abs=0.02)
    assert res.merge.is_merge and res.merge.method == "linear"
    assert res.merge.explained_fraction > 0.99
    assert res.entry("ft0").declared and not res.entry("ft1").declared
    res = _run(
        zoo, mk.task_arithmetic(zoo["base"], [m[2], m[3], m[4]], lambdas=[0.5, 0.8, 0.3]).state_dict
    )
    assert _parents(res) == pytest.approx({"ft2": 0.5, "ft3": 0.8, "ft4": 0.3}, abs=0.02)
    assert res.merge.method == "task_arithmetic"
    others = [e for e in res.entries if e.repo_id not in ("ft2", "ft3", "ft4")]
    assert all(e.relation == "unrelated" for e in others)


def test_ties_and_dare(zoo: dict) -> None:
    m = zoo["models"]
    r = mk.ties_merge(zoo["base"], [m[0], m[1]], density=0.5, weights=[0.6, 0.4], normalize=False)
    res = _run(zoo, r.state_dict)
    assert res.merge.method == "ties"
    assert _parents(res) == pytest.approx({"ft0": 0.6, "ft1": 0.4}, abs=0.10)
    r = mk.dare_merge(zoo["base"], [m[2], m[3]], drop=0.5, weights=[0.5, 0.5], seed=1)
    res = _run(zoo, r.state_dict)
    assert res.merge.method == "dare_linear"
    assert _parents(res) == pytest.approx({"ft2": 0.5, "ft3": 0.5}, abs=0.10)
    assert res.merge.signatures["zero_fraction"] > 0.2
    r = mk.dare_merge(
        zoo["base"], [m[2], m[3]], drop=0.5, weights=[0.5, 0.5], seed=1, ties=True, normalize=False
    )
    res = _run(zoo, r.state_dict)
    assert res.merge.method == "dare_ties"
    assert set(_parents(res)) == {"ft2", "ft3"}


def test_slerp_needs_base_term(zoo: dict) -> None:
    m = zoo["models"]
    r = mk.slerp_merge(m[4], m[5], t=0.3)
    res = _run(zoo, r.state_dict)
    assert _parents(res) == pytest.approx({"ft4": 0.7, "ft5": 0.3}, abs=0.10)
    assert res.merge.base_coefficient is not None and res.merge.base_coefficient > 0
    assert res.merge.method == "slerp"


def test_layerwise_recovered(zoo: dict) -> None:
    base, t = zoo["base"], zoo["taus"]
    lam = {0: (0.2, 0.8), 1: (0.5, 0.5), 2: (0.8, 0.2)}
    merged = {}
    for n in SHAPES:
        i = mk.layer_index(n)
        a, b = lam[i] if i is not None else (0.5, 0.5)
        merged[n] = base[n] + a * t[0][n] + b * t[1][n]
    res = _run(zoo, merged)
    assert res.merge.layerwise
    per = res.entry("ft0").per_layer_coefficient
    for i, (a, _) in lam.items():
        assert per[f"layer.{i}"] == pytest.approx(a, abs=0.03)
    plain = _run(
        zoo, mk.linear_merge([zoo["models"][0], zoo["models"][1]], weights=[0.5, 0.5]).state_dict
    )
    assert plain.merge.layerwise is False


def test_clone_dtype_and_noise_copies(zoo: dict) -> None:
    base, model = zoo["base"], zoo["models"][3]
    g = torch.Generator().manual_seed(9)
    for copy in (
        {n: model[n].to(torch.bfloat16).to(torch.float32) for n in SHAPES},
        {n: model[n] + 1e-3 * torch.randn(SHAPES[n], generator=g) for n in SHAPES},
    ):
        res = _run(zoo, copy)
        assert res.entry("ft3").relation == "clone"
        assert subject_is_derivative_of_candidate(res, "ft3")
        assert not res.merge.is_merge
    del base


def test_finetune_parent_and_unknown_parent(zoo: dict) -> None:
    base, t = zoo["base"], zoo["taus"]
    further = {n: base[n] + t[2][n] + task_vector(77)[n] for n in SHAPES}
    res = _run(zoo, further)
    assert res.entry("ft2").relation == "finetune_parent"
    assert res.entry("ft2").coefficient == pytest.approx(1.0, abs=0.05)
    assert not res.merge.is_merge
    unknown = {n: base[n] + 0.5 * t[1][n] + 0.5 * task_vector(88)[n] for n in SHAPES}
    res = _run(zoo, unknown)
    # half of it unexplained, one visible contributor: a same-data sibling looks exactly
    # like this, so it is related with its evidence, never a parent and never accused
    entry = res.entry("ft1")
    assert entry.relation == "sibling" and not entry.accusable
    assert entry.evidence is not None and not entry.evidence.accusable
    assert entry.evidence.explained_fraction == pytest.approx(0.5, abs=0.1)
    assert not res.merge.is_merge and _parents(res) == {}


def test_unrelated_and_reversed(zoo: dict) -> None:
    base = zoo["base"]
    res = _run(zoo, {n: base[n] + task_vector(99)[n] for n in SHAPES})
    assert all(e.relation == "unrelated" for e in res.entries)
    assert all(e.p_value > 1e-3 for e in res.entries)
    assert not res.merge.is_merge
    # the subject is ft0 itself; a merge of ft0 and ft1 is its child, not its parent
    cands = {k: v for k, v in zoo["cands"].items() if k != "ft0"}
    child = {n: 0.5 * zoo["taus"][0][n] + 0.5 * zoo["taus"][1][n] for n in SHAPES}
    cands["m01"] = fp(child)
    res = analyze_lineage(fp(zoo["taus"][0]), cands, base_fingerprint=zoo["base_fp"])
    assert res.entry("m01").relation == "related"
    assert not res.merge.is_merge


def test_permuted_derivative_recognised_after_alignment(zoo: dict) -> None:
    from auditor.analysis.align import align_to_base
    from auditor.weights.dict_sources import DictTensorSource
    from tests.test_align import HEADS, disguise

    base, model = zoo["base"], zoo["models"][5]
    stolen = disguise(model)
    raw = _run(zoo, stolen)
    assert raw.entry("ft5").relation != "clone"
    res = align_to_base(DictTensorSource(stolen), DictTensorSource(base), num_heads=HEADS)
    tv = {n: res.source.get(n) - base[n] for n in SHAPES}
    out = analyze_lineage(
        fp(tv), zoo["cands"], base_fingerprint=zoo["base_fp"], subject_aligned=res.report.applied
    )
    e = out.entry("ft5")
    assert e.aligned and e.relation in ("clone", "finetune_parent")
