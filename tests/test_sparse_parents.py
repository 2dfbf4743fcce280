"""Sparse merges (Breadcrumbs, DELLA, TIES, DARE): exactly the parents, recipe coefficients,
and the drop profile that tells a magnitude cut from a random drop.

Candidates include the hard negatives seen on the factory zoo: a same-data sibling of a
parent (shares its data direction) and a linear mix that contains that sibling."""

from __future__ import annotations

import pytest
import torch

from auditor.analysis.lineage import analyze_lineage
from auditor.analysis.sparse_fit import fit_sparse, rescale_kind
from auditor_testkit.factory import merge as mk
from auditor_testkit.factory import merge_sparse as ms
from tests.lineage_synth import SHAPES, add, base_weights, fp, fp_weights, task_vector


def _sibling(tau: dict[str, torch.Tensor], seed: int, share: float = 0.7):
    """Same data, another seed: most of the parent's direction plus its own part."""
    own = task_vector(500 + seed)
    return {n: share * tau[n] + (1 - share**2) ** 0.5 * own[n] for n in SHAPES}


@pytest.fixture(scope="module")
def zoo() -> dict:
    base = base_weights()
    taus = {f"ft{i}": task_vector(i) for i in range(4)}
    taus["ft0-sibling"] = _sibling(taus["ft0"], 1)
    taus["ft1-sibling"] = _sibling(taus["ft1"], 2)
    models = {n: add(base, t) for n, t in taus.items()}
    mix = mk.linear_merge([models["ft0-sibling"], models["ft3"]], weights=[0.5, 0.5])
    models["sibling-mix"] = mix.state_dict
    taus["sibling-mix"] = {n: mix.state_dict[n] - base[n] for n in SHAPES}
    return {"base": base, "models": models, "cands": {n: fp(t) for n, t in taus.items()},
            "base_fp": fp_weights(base)}


def _tv(zoo: dict, sd: dict[str, torch.Tensor]):
    return fp({n: sd[n] - zoo["base"][n] for n in SHAPES})


def _parents(res) -> dict[str, float]:
    return {e.repo_id: e.coefficient for e in res.entries if e.relation == "merge_parent"}


def test_della_keeps_exactly_its_parents_with_recipe_coefficients(zoo: dict) -> None:
    m = zoo["models"]
    r = ms.della_merge(zoo["base"], [m["ft0"], m["ft1"]], density=[0.45, 0.65], epsilon=0.1,
                       weights=[0.45, 0.7], seed=3, ties=True)
    res = analyze_lineage(_tv(zoo, r.state_dict), zoo["cands"], base_fingerprint=zoo["base_fp"])
    got = _parents(res)
    assert set(got) == {"ft0", "ft1"}
    assert got == pytest.approx({"ft0": 0.45, "ft1": 0.7}, abs=0.1)
    assert res.merge.method == "della"


def test_null_test_removes_a_sibling_mix_the_selection_let_in(zoo: dict) -> None:
    """With no selection threshold at all every candidate that lowers the residual gets
    in; only the shuffled stand-in test keeps the parents alone."""
    m = zoo["models"]
    r = ms.della_merge(zoo["base"], [m["ft0"], m["ft1"]], density=[0.6, 0.45], epsilon=0.1,
                       weights=[0.6, 0.5], seed=5, ties=False)
    subject = _tv(zoo, r.state_dict)
    order = ["ft0", "ft1", "sibling-mix", "ft0-sibling"]
    cands = {n: zoo["cands"][n] for n in order}
    sf = fit_sparse(subject, cands, keys=sorted(SHAPES), order=order, base=zoo["base_fp"],
                    min_gain=0.0)
    assert set(sf.parents) == {"ft0", "ft1"}
    assert sf.rejected  # the selection did let a stand-in in; the null test took it out
    assert all(g > 0.02 for g in sf.null_gaps)
    assert dict(zip(sf.parents, sf.recipe, strict=True)) == pytest.approx(
        {"ft0": 0.6, "ft1": 0.5}, abs=0.1)
    assert sf.rescale == "della"


def test_breadcrumbs_ties_coefficients_not_rescaled(zoo: dict) -> None:
    """Breadcrumbs cuts by magnitude and rescales nothing: the coefficients are the
    weights, whatever share of entries each parent kept."""
    m = zoo["models"]
    r = ms.breadcrumbs_merge(zoo["base"], [m["ft1"], m["ft2"]], density=[0.55, 0.75],
                             gamma=0.04, weights=[0.63, 0.5], ties=True)
    res = analyze_lineage(_tv(zoo, r.state_dict), zoo["cands"], base_fingerprint=zoo["base_fp"])
    assert _parents(res) == pytest.approx({"ft1": 0.63, "ft2": 0.5}, abs=0.1)
    assert res.merge.method == "breadcrumbs_ties"


def test_drop_profiles_tell_cut_from_flat_and_graded_drops(zoo: dict) -> None:
    m, keys = zoo["models"], sorted(SHAPES)
    order = ["ft2", "ft3", "ft0", "ft1"]

    def fit(res: mk.MergeResult):
        return fit_sparse(_tv(zoo, res.state_dict), zoo["cands"], keys=keys, order=order,
                          base=zoo["base_fp"])

    ties = fit(ms.ties_dare_merge(zoo["base"], [m["ft2"], m["ft3"]], method="ties",
                                  density=[0.4, 0.6], weights=[0.7, 0.5], seed=1))
    dare = fit(ms.ties_dare_merge(zoo["base"], [m["ft2"], m["ft3"]], method="dare_linear",
                                  density=[0.4, 0.6], weights=[0.7, 0.5], seed=1))
    assert rescale_kind(ties.profiles) == "none" and ties.rescale == "none"
    assert dare.rescale == "dare"
    for sf in (ties, dare):
        assert dict(zip(sf.parents, sf.recipe, strict=True)) == pytest.approx(
            {"ft2": 0.7, "ft3": 0.5}, abs=0.05)


def test_a_published_merge_holding_two_parents_gives_way_to_them(zoo: dict) -> None:
    """A task-arithmetic merge of two of the parents and a non-parent explains the subject
    well but never exactly; its members do (an exact TIES fit)."""
    m, base = zoo["models"], zoo["base"]
    ta = mk.task_arithmetic(base, [m["ft1-sibling"], m["ft1"], m["ft2"]],
                            lambdas=[0.7, 0.38, 0.84])
    cands = {**zoo["cands"], "ta-mix": _tv(zoo, ta.state_dict)}
    r = ms.ties_dare_merge(base, [m["ft2"], m["ft1"], m["ft0"]], method="ties",
                           density=[0.61, 0.4, 0.6], weights=[0.42, 0.45, 0.84], seed=1)
    res = analyze_lineage(_tv(zoo, r.state_dict), cands, base_fingerprint=zoo["base_fp"])
    assert _parents(res) == pytest.approx({"ft0": 0.84, "ft1": 0.45, "ft2": 0.42}, abs=0.02)
    assert res.entry("ta-mix").relation != "merge_parent"
