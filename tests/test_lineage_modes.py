"""Lineage failure modes seen on the factory zoo, reproduced on synthetic task vectors:
sparse-merge coefficients, merged candidates, same-task siblings, clone groups, protected
copies."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import torch

from auditor.analysis.align import align_to_base
from auditor.analysis.lineage import analyze_lineage
from auditor.analysis.similarity import cosine_report
from auditor.weights.dict_sources import DictTensorSource
from auditor_testkit.factory import disguise as dg
from auditor_testkit.factory import merge as mk
from tests.lineage_synth import SHAPES, add, base_weights, fp, fp_weights, task_vector

N_FT = 6


@pytest.fixture(scope="module")
def zoo() -> dict:
    base = base_weights()
    taus = [task_vector(i) for i in range(N_FT)]
    return {
        "base": base,
        "taus": taus,
        "models": [add(base, t) for t in taus],
        "cands": {f"ft{i}": fp(t) for i, t in enumerate(taus)},
        "base_fp": fp_weights(base),
    }


def _tv(zoo: dict, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: sd[n] - zoo["base"][n] for n in SHAPES}


def _parents(res) -> dict[str, float]:
    return {e.repo_id: e.coefficient for e in res.entries if e.relation == "merge_parent"}


def test_unnormalised_ties_and_dare_ties_coefficients_exact(zoo: dict) -> None:
    m, base = zoo["models"], zoo["base"]
    r = mk.ties_merge(base, [m[0], m[1], m[2]], density=0.5, weights=[0.8, 0.6, 0.5],
                      normalize=False)
    res = analyze_lineage(fp(_tv(zoo, r.state_dict)), zoo["cands"], base_fingerprint=zoo["base_fp"])
    assert res.merge.method == "ties"
    assert _parents(res) == pytest.approx({"ft0": 0.8, "ft1": 0.6, "ft2": 0.5}, abs=0.02)
    r = mk.dare_merge(base, [m[3], m[4]], drop=0.5, weights=[0.6, 0.8], seed=2, ties=True,
                      normalize=False)
    res = analyze_lineage(fp(_tv(zoo, r.state_dict)), zoo["cands"], base_fingerprint=zoo["base_fp"])
    assert res.merge.method == "dare_ties"
    assert _parents(res) == pytest.approx({"ft3": 0.6, "ft4": 0.8}, abs=0.06)


def test_primitive_parents_preferred_over_a_merged_candidate(zoo: dict) -> None:
    m, base = zoo["models"], zoo["base"]
    cands = dict(zoo["cands"])
    cands["ta01"] = fp(_tv(zoo, mk.task_arithmetic(base, [m[0], m[1]], lambdas=[0.8, 0.5])
                           .state_dict))
    r = mk.ties_merge(base, [m[0], m[1], m[2]], density=0.5, weights=[0.7, 0.5, 0.6],
                      normalize=False)
    res = analyze_lineage(fp(_tv(zoo, r.state_dict)), cands, base_fingerprint=zoo["base_fp"])
    assert set(_parents(res)) == {"ft0", "ft1", "ft2"}
    # a merge of two of the parents: a co-descendant, never a parent, never accused
    assert res.entry("ta01").relation in ("related", "sibling")
    assert not res.entry("ta01").accusable


def test_same_task_siblings_are_related_not_parents(zoo: dict) -> None:
    # two seeds on one data set share an update whose share differs from neuron to neuron
    g = torch.Generator().manual_seed(5)
    shared = task_vector(50)
    sibs = {}
    for name, seed in (("sib_a", 51), ("sib_b", 52)):
        own = task_vector(seed, scale=0.025)
        sibs[name] = {
            n: (torch.rand(SHAPES[n][0], *([1] * (len(SHAPES[n]) - 1)), generator=g) * 1.2 + 0.4)
            * shared[n] + own[n]
            for n in SHAPES
        }
    cands = {**zoo["cands"], "sib_b": fp(sibs["sib_b"])}
    res = analyze_lineage(fp(sibs["sib_a"]), cands, base_fingerprint=zoo["base_fp"])
    assert res.entry("sib_b").relation == "sibling"
    assert not res.entry("sib_b").accusable
    assert not res.merge.is_merge
    # a merge with an unpublished co-parent looks exactly like that (a partial fit, a
    # sibling-sized residual): related, with its evidence, but not enough to accuse
    hidden = {n: 0.6 * zoo["taus"][1][n] + 0.6 * task_vector(88)[n] for n in SHAPES}
    res = analyze_lineage(fp(hidden), cands, base_fingerprint=zoo["base_fp"])
    assert _parents(res) == {}
    assert res.entry("ft1").relation == "sibling" and not res.entry("ft1").accusable


def test_clone_groups_collapse_to_the_oldest(zoo: dict) -> None:
    m, base = zoo["models"], zoo["base"]
    copy = {n: m[3][n].to(torch.float16).float() for n in SHAPES}
    cands = {"copy3": fp(_tv(zoo, copy)), **zoo["cands"]}
    subject = fp(_tv(zoo, mk.task_arithmetic(base, [m[3], m[4]], lambdas=[0.7, 0.4]).state_dict))
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    older = {"ft3": t0, "copy3": t0.replace(month=2)}
    res = analyze_lineage(subject, cands, base_fingerprint=zoo["base_fp"], created_at=older)
    assert _parents(res) == pytest.approx({"ft3": 0.7, "ft4": 0.4}, abs=0.02)
    assert res.entry("copy3").relation == "related"
    # the same copy uploaded first is the original as far as anyone can tell
    newer = {"ft3": t0.replace(month=3), "copy3": t0}
    res = analyze_lineage(subject, cands, base_fingerprint=zoo["base_fp"], created_at=newer)
    assert set(_parents(res)) == {"copy3", "ft4"}
    assert res.entry("ft3").relation == "related"


def test_protected_copy_realigned_through_vo_matrices(zoo: dict) -> None:
    base, model, tau = zoo["base"], zoo["models"][2], zoo["taus"][2]
    prot = dg.protect(model, num_heads=4, seed=5).state_dict
    res = align_to_base(DictTensorSource(prot), DictTensorSource(base), num_heads=4)
    assert res.report.applied and res.report.rescaled
    aligned = {n: res.source.get(n) - base[n] for n in SHAPES}
    rep = cosine_report(fp(aligned), fp(tau))
    assert rep.cosine > 0.97 and rep.norm_ratio == pytest.approx(1.0, abs=0.05)
    out = analyze_lineage(fp(aligned), zoo["cands"], base_fingerprint=zoo["base_fp"],
                          subject_aligned=True)
    e = out.entry("ft2")
    assert e.aligned and e.relation == "clone"
    # and the honest fine-tune sees the aligned protected copy as its clone, not a parent
    cands = {**zoo["cands"], "prot": fp(aligned)}
    del cands["ft2"]
    back = analyze_lineage(fp(tau), cands, base_fingerprint=zoo["base_fp"])
    assert back.entry("prot").relation == "clone"


def test_identical_evidence_gives_identical_relation(zoo: dict) -> None:
    # A re-upload of a candidate the subject does not use: both have the same cosine and
    # p-value to the subject, so both get the same relation (was "related" vs "unrelated").
    m, base = zoo["models"], zoo["base"]
    copy = {n: m[5][n].to(torch.float16).float() for n in SHAPES}
    cands = {"copy5": fp(_tv(zoo, copy)), **zoo["cands"]}
    subject = fp(_tv(zoo, mk.task_arithmetic(base, [m[3], m[4]], lambdas=[0.7, 0.4]).state_dict))
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    res = analyze_lineage(subject, cands, base_fingerprint=zoo["base_fp"],
                          created_at={"ft5": t0, "copy5": t0.replace(month=2)})
    a, b = res.entry("ft5"), res.entry("copy5")
    assert a.cosine == pytest.approx(b.cosine, abs=1e-3)
    assert a.relation == b.relation == "unrelated"
    assert b.copy_of == "ft5" and a.copy_of is None


def test_merge_made_from_the_subject_is_not_its_finetune_parent(zoo: dict) -> None:
    """A fine-tune audited after someone merged it with its same-data sibling: the merge
    carries nearly all of the subject (coefficient ~1, similar norm), which reads like a
    further fine-tune the wrong way round. It is made *from* the subject: related only."""
    taus = zoo["taus"]
    own = task_vector(77)
    sibling = {n: 0.7 * taus[0][n] + 0.71 * own[n] for n in SHAPES}
    merged = {n: 0.76 * taus[0][n] + 0.31 * sibling[n] for n in SHAPES}
    cands = {**{k: v for k, v in zoo["cands"].items() if k != "ft0"},
             "sibling": fp(sibling), "sibling-ta": fp(merged)}
    res = analyze_lineage(fp(taus[0]), cands, base_fingerprint=zoo["base_fp"])
    assert res.parents() == []
    assert res.entry("sibling-ta").relation == "related"


def test_mix_weighted_towards_one_sibling_is_a_merge_not_a_copy(zoo: dict) -> None:
    """0.7 of one fine-tune and 0.3 of its same-data sibling is within a re-upload's
    distance of the first, yet exactly a linear merge of the two."""
    taus = zoo["taus"]
    own = task_vector(78)
    sibling = {n: 0.95 * taus[0][n] + 0.31 * own[n] for n in SHAPES}
    mix = {n: 0.7 * taus[0][n] + 0.3 * sibling[n] for n in SHAPES}
    cands = {**zoo["cands"], "sibling": fp(sibling)}
    res = analyze_lineage(fp(mix), cands, base_fingerprint=zoo["base_fp"])
    assert res.merge.is_merge
    assert _parents(res) == pytest.approx({"ft0": 0.7, "sibling": 0.3}, abs=0.01)


def test_merge_fine_tuned_further_is_a_merge_of_its_parents(zoo: dict) -> None:
    """A task-arithmetic merge trained a little more on another task: not exact, but each
    parent carries a share of its own far above the residual the fine-tune left."""
    taus = zoo["taus"]
    extra = task_vector(90, scale=0.011)
    sub = {n: 0.5 * taus[0][n] + 0.6 * taus[1][n] + extra[n] for n in SHAPES}
    res = analyze_lineage(fp(sub), zoo["cands"], base_fingerprint=zoo["base_fp"])
    assert res.merge.is_merge
    assert _parents(res) == pytest.approx({"ft0": 0.5, "ft1": 0.6}, abs=0.05)
    ev = res.entry("ft0").evidence
    assert ev is not None and ev.verdict == "finetuned_merge"
    assert ev.parent_own_share is not None and ev.parent_own_share >= 3.0


def test_sibling_trimmed_by_a_related_candidate_is_not_a_merge(zoo: dict) -> None:
    """Same-data siblings (here: a shared update d, one of them also trained along e):
    the subject fits as 0.85 of one plus 0.3 of the other with a small residual and
    uniform shares, yet the second only trims what the first leaves, and the two explain
    each other. No accusation (the old gate, residual and per-layer uniformity, accused)."""
    d, e = task_vector(60), task_vector(61)
    own = {k: task_vector(k, scale=0.01) for k in (62, 63, 64)}
    a = {n: d[n] + own[62][n] for n in SHAPES}
    b = {n: 0.5 * d[n] + e[n] + own[63][n] for n in SHAPES}
    sub = {n: d[n] + 0.3 * e[n] + own[64][n] for n in SHAPES}
    cands = {**zoo["cands"], "sib_a": fp(a), "sib_b": fp(b)}
    res = analyze_lineage(fp(sub), cands, base_fingerprint=zoo["base_fp"])
    assert not res.merge.is_merge
    assert _parents(res) == {}
    for name in ("sib_a", "sib_b"):
        assert not res.entry(name).accusable
    ev = res.entry("sib_a").evidence
    assert ev is not None and ev.verdict == "sibling" and "own share" in ev.reason


def test_a_member_that_only_trims_the_residual_is_left_out(zoo: dict) -> None:
    """Forward selection can take in a published merge of the same parents at ~0.02; kept,
    its coefficient fails the fine-tuned-merge gate and hides the two real parents."""
    from auditor.analysis.similarity import build_gram
    from auditor.analysis.verdicts import drop_trimmers

    taus = zoo["taus"]
    r = mk.ties_merge(zoo["base"], [zoo["models"][0], zoo["models"][1]], density=0.5,
                      weights=[0.9, 0.7], normalize=False)
    pub = _tv(zoo, r.state_dict)
    extra = task_vector(90, scale=0.011)
    sub = {n: 0.75 * taus[0][n] + 0.8 * taus[1][n] + 0.03 * pub[n] + extra[n]
           for n in SHAPES}
    stack = build_gram([("s", fp(sub)), ("pub", fp(pub)), ("ft0", zoo["cands"]["ft0"]),
                        ("ft1", zoo["cands"]["ft1"])])
    assert sorted(drop_trimmers(stack.total, [1, 2, 3], None)) == [2, 3]
    # a real third parent with a small coefficient stays: it explains far more on its own
    # than the residual it leaves
    sub3 = {n: 0.75 * taus[0][n] + 0.8 * taus[1][n] + 0.12 * taus[2][n] for n in SHAPES}
    stack = build_gram([("s", fp(sub3)), ("ft2", zoo["cands"]["ft2"]),
                        ("ft0", zoo["cands"]["ft0"]), ("ft1", zoo["cands"]["ft1"])])
    assert sorted(drop_trimmers(stack.total, [1, 2, 3], None)) == [1, 2, 3]
