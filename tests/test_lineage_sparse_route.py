"""A TIES merge of three parents zeroes a coordinate only where all three were trimmed, so
its zero fraction may rise only a few points over the family's: below the margin that
routes a subject to the sparse fit. Its kept coordinates are still its parents' values
times fixed coefficients, exactly; that alone routes it. A fine-tune with a few extra
zeros whose published child is a sparse merge of it is reproduced by that child only
where the child kept it alone, and is never called a merge of it."""

from __future__ import annotations

import pytest
import torch

import auditor.analysis.lineage as lineage
from auditor.analysis.lineage import analyze_lineage
from auditor_testkit.factory import merge_sparse as ms
from tests.lineage_synth import SHAPES, Tensors, add, base_weights, fp, fp_weights, task_vector

# rows of the vocabulary no fine-tune touched: zero in every task vector
_UNUSED = 10


def _masked(tv: Tensors) -> Tensors:
    out = dict(tv)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = tv[name].clone()
        t[:_UNUSED] = 0.0
        out[name] = t
    return out


def _sibling(tv: Tensors, seed: int, share: float = 0.97) -> Tensors:
    own = task_vector(600 + seed)
    return _masked({n: share * tv[n] + (1 - share**2) ** 0.5 * own[n] for n in SHAPES})


@pytest.fixture(scope="module")
def family() -> dict:
    base = base_weights()
    taus = {f"ft{i}": _masked(task_vector(i)) for i in range(6)}
    # same-data siblings of non-parents: a family whose siblings leave small residuals
    for i in (3, 4, 5):
        taus[f"ft{i}-sib"] = _sibling(taus[f"ft{i}"], i)
    return {"base": base, "taus": taus, "base_fp": fp_weights(base)}


def _ties(family: dict, parents: list[str], density: list[float],
          weights: list[float]) -> Tensors:
    base, taus = family["base"], family["taus"]
    r = ms.ties_dare_merge(base, [add(base, taus[p]) for p in parents], method="ties",
                           density=density, weights=weights, seed=1)
    return {n: r.state_dict[n] - base[n] for n in SHAPES}


def _parents(res: lineage.LineageResult) -> dict[str, float | None]:
    return {e.repo_id: e.coefficient for e in res.entries if e.relation == "merge_parent"}


def test_three_parent_ties_with_few_extra_zeros_is_routed_to_the_sparse_fit(
        family: dict) -> None:
    merged = _ties(family, ["ft0", "ft1", "ft2"], [0.6, 0.65, 0.7], [0.9, 0.7, 0.5])
    subject = fp(merged)
    cands = {n: fp(t) for n, t in family["taus"].items()}
    typical = sorted(c.zero_fraction for c in cands.values())[len(cands) // 2]
    assert typical < subject.zero_fraction < typical + 0.05  # below the zero margin
    res = analyze_lineage(subject, cands, base_fingerprint=family["base_fp"])
    assert res.merge.is_merge
    assert _parents(res) == pytest.approx({"ft0": 0.9, "ft1": 0.7, "ft2": 0.5}, abs=0.05)
    ev = res.entry("ft0").evidence
    assert ev is not None and ev.verdict == "sparse_merge" and ev.exact_fraction > 0.9


def test_without_the_exact_screen_the_dense_fit_does_not_accuse(
        family: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The routing is what finds this merge: the dense fit alone calls it no merge."""
    monkeypatch.setattr(lineage, "kept_reproduced", lambda *a, **k: False)
    merged = _ties(family, ["ft0", "ft1", "ft2"], [0.6, 0.65, 0.7], [0.9, 0.7, 0.5])
    cands = {n: fp(t) for n, t in family["taus"].items()}
    res = analyze_lineage(fp(merged), cands, base_fingerprint=family["base_fp"])
    assert not res.merge.is_merge


def test_a_fine_tune_is_never_a_merge_of_its_sparse_child(family: dict) -> None:
    taus = family["taus"]
    child = _ties(family, ["ft0", "ft1"], [0.7, 0.5], [0.8, 0.6])
    subject = dict(taus["ft0"])
    w = subject["model.layers.0.mlp.up_proj.weight"].clone()
    w[:8] = 0.0  # a few extra zeros: the screen runs
    subject["model.layers.0.mlp.up_proj.weight"] = w
    cands = {n: fp(t) for n, t in taus.items() if n != "ft0"}
    cands["child"] = fp(child)
    res = analyze_lineage(fp(subject), cands, base_fingerprint=family["base_fp"])
    assert not res.merge.is_merge
    assert not any(e.accusable for e in res.entries)
    assert torch.count_nonzero(w) < w.numel()
