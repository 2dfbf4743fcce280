"""A merge of same-data siblings, fine-tuned further: its parents leave each other little
of their own (they share the data's direction), so the absolute floor on a parent's own
share rejects it. It is accused against the parents' own siblings, never without them,
and a sibling of the group is never called a merge of two others."""

from __future__ import annotations

import math

import pytest

from auditor.analysis.lineage import analyze_lineage
from auditor.analysis.verdicts import FamilyNull, ParentSiblingNull, dense_verdict
from tests.lineage_synth import SHAPES, Tensors, base_weights, fp, fp_weights, task_vector


@pytest.fixture(scope="module")
def family() -> dict:
    # four fine-tunes on one data set: a shared update plus a seed's own (cosine ~0.8)
    shared = task_vector(70)
    sibs = {f"sib_{k}": {n: shared[n] + task_vector(71 + i, scale=0.025)[n] for n in SHAPES}
            for i, k in enumerate("abcd")}
    others = {f"ft{i}": fp(task_vector(i)) for i in range(4)}
    return {"sibs": sibs, "others": others, "base_fp": fp_weights(base_weights())}


def _merge_tuned(sibs: dict[str, Tensors]) -> Tensors:
    extra = task_vector(95, scale=0.01)  # a short fine-tune on another task on top
    return {n: 0.7 * sibs["sib_a"][n] + 0.8 * sibs["sib_b"][n] + extra[n] for n in SHAPES}


def _parents(res) -> dict[str, float]:
    return {e.repo_id: e.coefficient for e in res.entries if e.relation == "merge_parent"}


def test_merge_of_siblings_fine_tuned_is_attributed(family: dict) -> None:
    cands = {**family["others"], **{k: fp(v) for k, v in family["sibs"].items()}}
    res = analyze_lineage(fp(_merge_tuned(family["sibs"])), cands,
                          base_fingerprint=family["base_fp"])
    assert res.merge.is_merge
    assert _parents(res) == pytest.approx({"sib_a": 0.7, "sib_b": 0.8}, abs=0.05)
    ev = res.entry("sib_a").evidence
    assert ev is not None and ev.verdict == "finetuned_merge" and ev.accusable
    assert "siblings of one another" in ev.reason
    # the other siblings are related, never parents
    for name in ("sib_c", "sib_d"):
        assert res.entry(name).relation != "merge_parent"
        assert not res.entry(name).accusable


def test_without_a_sibling_of_the_parents_there_is_no_accusation(family: dict) -> None:
    """Nothing to compare the parents' small own shares with: a same-recipe sibling that
    interpolates two others looks the same, so no accusation."""
    sibs = family["sibs"]
    cands = {**family["others"], "sib_a": fp(sibs["sib_a"]), "sib_b": fp(sibs["sib_b"])}
    res = analyze_lineage(fp(_merge_tuned(sibs)), cands, base_fingerprint=family["base_fp"])
    assert not res.merge.is_merge
    assert not any(e.accusable for e in res.entries)


def test_a_sibling_is_never_a_merge_of_its_siblings(family: dict) -> None:
    sibs = family["sibs"]
    for subject in sibs:
        cands = {**family["others"], **{k: fp(v) for k, v in sibs.items() if k != subject}}
        res = analyze_lineage(fp(sibs[subject]), cands, base_fingerprint=family["base_fp"])
        assert not res.merge.is_merge, subject
        assert not any(e.accusable for e in res.entries), subject


def _verdict(own_share: float, *, null: ParentSiblingNull | None, consistent: bool = True):
    # a merge of two siblings fine-tuned further: 0.951 explained, each parent's own share
    # ``own_share`` of the subject (residual 0.049)
    return dense_verdict(
        n_parents=2, coefficients=[0.55, 0.66], explained=0.951, recipe_res=0.05,
        fam=FamilyNull(n_pairs=40, n_related=12, sibling_residual=0.12),
        single_finetune=False, own_shares=[own_share, 0.2], parents_related=True,
        sibling_null=null, layers_consistent=consistent)


def test_against_the_parents_siblings_the_absolute_own_share_bar_gives_way() -> None:
    """Own shares 1.4 times the residual fall under the bar set without a null (1.5), but
    against six siblings of the parents (at most 0.27, residuals from 0.10) the subject
    stands out on both, and its layers are one recipe."""
    null = ParentSiblingNull(n=6, own_ratio=0.27, residual=0.10)
    v = _verdict(0.0686, null=null)
    assert v.verdict == "finetuned_merge" and v.accusable
    assert "siblings of one another" in v.reason
    # without the null, with per-layer coefficients that are no recipe, or with a parent
    # that carries less than the unexplained rest: no accusation
    assert not _verdict(0.0686, null=None).accusable
    assert not _verdict(0.0686, null=ParentSiblingNull(0, 0.0, math.inf)).accusable
    assert not _verdict(0.0686, null=null, consistent=False).accusable
    assert not _verdict(0.04, null=null).accusable
    # a null that leaves residuals as small as the subject's: no standout
    assert not _verdict(0.0686, null=ParentSiblingNull(n=6, own_ratio=0.27,
                                                       residual=0.09)).accusable
