"""Candidates that stand in for a parent must not be named as one (each a false AUD101):

- a layer-wise merge's global fit takes in a same-data sibling of one parent to mimic the
  per-layer weights; the tensor-by-tensor recipe is exact with or without it, so the
  exact set is pruned to the members it needs;
- a sparse merge's forward selection may start from a published merge that holds one of
  the parents (and two other models); chosen beside that parent it only blocks the exact
  fit, and dropping it (or trading it for its members) is tried.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import auditor.analysis.lineage as lineage
import auditor.analysis.sparse_fit as sf
from auditor.analysis.lineage import analyze_lineage
from auditor_testkit.factory import merge_sparse as ms
from tests.lineage_synth import (
    SHAPES,
    Tensors,
    add,
    base_weights,
    combine,
    fp,
    fp_weights,
    task_vector,
)


def _group(name: str) -> int:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else 3


def _layerwise(taus: list[Tensors], per_layer: list[list[float]]) -> Tensors:
    """Each parent weighted per layer (index 3: embeddings, norm, head)."""
    return {n: sum(w[_group(n)] * t[n] for w, t in zip(per_layer, taus, strict=True))
            for n in SHAPES}


def _parents(res: lineage.LineageResult) -> dict[str, float | None]:
    return {e.repo_id: e.coefficient for e in res.entries if e.relation == "merge_parent"}


def _sibling(tv: Tensors, seed: int, shares: list[float]) -> Tensors:
    """A same-data fine-tune: the other's direction, a share of it that varies by layer
    (as trained siblings' does), plus an update of its own."""
    own = task_vector(seed)
    return {n: shares[_group(n)] * tv[n] + (1 - shares[_group(n)] ** 2) ** 0.5 * own[n]
            for n in SHAPES}


@pytest.fixture(scope="module")
def taus() -> dict[str, Tensors]:
    out = {f"ft{i}": task_vector(i) for i in range(6)}
    out["ft0-sib"] = _sibling(out["ft0"], 77, [0.3, 0.6, 0.95, 0.6])
    # same-domain fine-tunes by other owners, of the sparse merge's first and last parents
    out["ft0-dom"] = _sibling(out["ft0"], 78, [0.7] * 4)
    out["ft2-dom"] = _sibling(out["ft2"], 79, [0.7] * 4)
    return out


def test_layerwise_merge_does_not_name_the_sibling_of_a_parent(
        taus: dict[str, Tensors]) -> None:
    subject = _layerwise([taus["ft0"], taus["ft1"]],
                         [[0.35, 0.6, 0.85, 0.5], [0.46, 0.3, 0.18, 0.35]])
    cands = {n: fp(t) for n, t in taus.items() if not n.endswith("-dom")}
    res = analyze_lineage(fp(subject), cands)
    assert res.merge.is_merge
    assert set(_parents(res)) == {"ft0", "ft1"}
    assert res.entry("ft0-sib").relation != "merge_parent"


def test_sparse_merge_does_not_name_a_published_merge_holding_a_parent(
        taus: dict[str, Tensors]) -> None:
    base = base_weights()
    parents = ["ft0", "ft1", "ft2"]
    r = ms.ties_dare_merge(base, [add(base, taus[p]) for p in parents], method="ties",
                           density=[0.33, 0.57, 0.46], weights=[0.575, 0.596, 0.485], seed=3)
    subject = {n: r.state_dict[n] - base[n] for n in SHAPES}
    cands = {n: fp(t) for n, t in taus.items()}
    # another owner's task-arithmetic merge of the middle parent and two same-domain
    # fine-tunes of the others: more aligned with the subject than any parent alone
    cands["pub-mix"] = fp(combine([taus["ft0-dom"], taus["ft2-dom"], taus["ft1"]],
                                  [0.646, 0.461, 0.789]))
    res = analyze_lineage(fp(subject), cands, base_fingerprint=fp_weights(base))
    assert res.merge.is_merge
    assert _parents(res) == pytest.approx({"ft0": 0.575, "ft1": 0.596, "ft2": 0.485}, abs=0.05)
    assert torch.isfinite(torch.tensor(list(_parents(res).values()))).all()


def test_exact_set_is_pruned_to_the_members_it_needs(
        taus: dict[str, Tensors], monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a seed-974648 zoo: the global forward fit took the sibling in beside both
    parents (0.08); every pruned set must stay exact, and a needed parent stays."""
    subject = _layerwise([taus["ft0"], taus["ft1"]],
                         [[0.35, 0.6, 0.85, 0.5], [0.46, 0.3, 0.18, 0.35]])
    cands = {n: fp(t) for n, t in taus.items() if not n.endswith("-dom")}
    select = lineage.select_parents

    def with_sibling(stack, pool, **kw):  # type: ignore[no-untyped-def]
        sel = select(stack, pool, **kw)
        extra = stack.names.index("ft0-sib")
        return replace(sel, members=(*sel.members, extra))

    monkeypatch.setattr(lineage, "select_parents", with_sibling)
    res = analyze_lineage(fp(subject), cands)
    assert res.merge.is_merge
    assert set(_parents(res)) == {"ft0", "ft1"}
    # without the pruning the sibling is named (the false AUD101 this guards against)
    monkeypatch.setattr(lineage, "prune_exact", lambda stack, members, *a: list(members))
    assert "ft0-sib" in _parents(analyze_lineage(fp(subject), cands))


def test_a_stand_in_chosen_beside_its_member_is_dropped(taus: dict[str, Tensors]) -> None:
    """As on a seed-861800 zoo: forward selection chose the published merge first, then
    the parent it holds; its other members are no parents, so its exact members outside
    the chosen set are none, and only dropping it lets the third parent in."""
    base = base_weights()
    parents = ["ft0", "ft1", "ft2"]
    r = ms.ties_dare_merge(base, [add(base, taus[p]) for p in parents], method="ties",
                           density=[0.33, 0.57, 0.46], weights=[0.575, 0.596, 0.485], seed=3)
    subject = fp({n: r.state_dict[n] - base[n] for n in SHAPES})
    cands = {n: fp(t) for n, t in taus.items()}
    cands["pub-mix"] = fp(combine([taus["ft0-dom"], taus["ft2-dom"], taus["ft1"]],
                                  [0.646, 0.461, 0.789]))
    keys = sorted(subject.tensors)
    y, xs, floor = sf._arrays(subject, cands, keys, fp_weights(base))
    chosen = sf._expand_merged(y, xs, floor, list(cands), ["pub-mix", "ft1", "ft2"], 0.02)
    assert sorted(chosen) == ["ft0", "ft1", "ft2"]



def test_near_exact_fit_accuses_only_far_below_the_siblings() -> None:
    """A disguised merge's realignment leaves float noise above the exact threshold: a
    residual 0.002 of the siblings' with every parent's own share 174x it is a merge,
    however small that share; 10x it is not (non-merges reach 1.43x)."""
    from auditor.analysis.verdicts import FamilyNull, dense_verdict

    fam = FamilyNull(n_pairs=300, n_related=200, sibling_residual=0.32)

    def verdict(own: list[float]) -> object:
        return dense_verdict(n_parents=2, coefficients=[0.884, 0.473], explained=1 - 6e-4,
                             recipe_res=4e-3, fam=fam, single_finetune=False,
                             own_shares=own)

    near = verdict([0.35, 0.104])
    assert near.accusable and near.verdict == "finetuned_merge"  # type: ignore[attr-defined]
    assert not verdict([0.35, 0.006]).accusable  # type: ignore[attr-defined]


def test_a_third_parent_from_another_domain_completes_the_exact_recipe(
        taus: dict[str, Tensors]) -> None:
    """Two same-data siblings explain 0.96 of their merge with a third model; many more
    siblings rank above the third parent by cosine with the subject, so only what the two
    leave unexplained points at it."""
    pool = {f"code{i}": _sibling(taus["ft0"], 200 + i, [0.8] * 4) for i in range(12)}
    pool["copy"] = taus["ft3"]
    pool.update({f"ft{i}": taus[f"ft{i}"] for i in (4, 5)})
    subject = combine([pool["code0"], pool["copy"], pool["code1"]], [0.725, 0.431, 0.724])
    cands = {n: fp(t) for n, t in pool.items()}
    res = analyze_lineage(fp(subject), cands)
    assert _parents(res) == pytest.approx({"code0": 0.725, "copy": 0.431, "code1": 0.724},
                                          abs=0.02)
    # the completion itself: from the two siblings, the candidate the rest points at
    from auditor.analysis.exact_sets import complete_exact
    from auditor.analysis.similarity import build_gram

    stack = build_gram([("s", fp(subject)), *cands.items()])
    ix = {n: stack.names.index(n) for n in cands}
    pool = list(ix.values())
    two = [ix["code0"], ix["code1"]]
    assert complete_exact(stack, two, pool, None, 1.0, 1e-3) == [*two, ix["copy"]]
    assert complete_exact(stack, two, [j for j in pool if j != ix["copy"]], None, 1.0,
                          1e-3) is None
