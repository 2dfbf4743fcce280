"""Lineage verdicts: is a parent fit a merge, a further fine-tune, or only a sibling?

Siblings that share data share a large part of their task vectors (the data's own
direction), so a least-squares fit happily "explains" one with the other, and a p-value
against unrelated pairs calls any sibling significant. A real merge leaves traces a
sibling does not, and only those make an accusation:

* ``exact_merge``: the subject *is* the combination, up to rounding, at the recipe's own
  granularity (one coefficient per parent for linear / task arithmetic, per layer for
  layer-wise merges, per tensor for SLERP): its residual is tiny next to the residuals the
  family's closest siblings leave (``FamilyNull``);
* ``sparse_merge``: many more exact zeros than any fine-tune (trimmed or dropped), and
  the kept coordinates reproduced by the parents (``sparse_fit``);
* ``finetuned_merge``: a merge fine-tuned further: two or more parents, a residual
  below the siblings', and each parent carrying a share of its own (what the fit loses
  without it) well above all that is left unexplained and a sizeable part of the
  subject. A sibling's second "parent" only trims the residual the first leaves
  (measured on random lineage-hard zoos: at most 1.43 times the residual and 0.09 of the
  subject, against 1.7-7.4 times and 0.15-0.6 for merges fine-tuned 20 steps on another
  task). Whether the parents are related to one another, and per-layer consistency,
  are reported, not gated on: parents of one domain still each carry their own share, a
  fine-tune on top moves layers unevenly, and same-seed siblings trained at other
  learning rates keep uniform shares.
* ``finetuned_merge`` of *sibling* parents: parents that share their data's direction
  leave each other little of their own (each one's own share is its coefficient^2 times
  what it has beyond the others), so a merge of two same-data siblings fine-tuned further
  passes every gate above but the floor of 0.12 on the own share. For such parents the
  floor gives way to the right null, the parents' own siblings (``parent_sibling_null``:
  the other candidates aligned with every parent, fitted on the same parents): the
  subject's least own share over its residual must be ``STANDOUT`` times the best of
  theirs and its residual ``STANDOUT`` times below the smallest of theirs, and its
  per-layer coefficients must be one recipe (chi-square within its 99% quantile). Against
  that null the bar set without one (``UNIQUE_OVER_RESIDUAL``) gives way too: each parent
  need only carry more than all that is left unexplained (a fine-tune on top leaves
  sibling parents little of their own: 1.4 times the residual, against 0.27 at most for
  six siblings of theirs, on a seed-44 zoo). Both
  are needed: a same-recipe sibling fitted on the two others of its group (the middle
  learning rate interpolating the outer two: own share 2.3 times the residual, 0.03 of
  the subject) has no plain sibling left to compare with and stands out against the
  merges in its null, but its per-layer chi-square is 65. With no candidate aligned with
  every parent, there is no null and no accusation.

Everything else (a fit with a large residual) is at most a sibling: related, never a
parent, never a finding against its owner.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from auditor.analysis.attribution import solve
from auditor.analysis.calibration import NullModel, relatedness
from auditor.analysis.similarity import GramStack

# The recipe residual of an exact merge must be this far below the closest siblings'
EXACT_SHARE = 0.01
EXACT_MAX = 2e-3
EXACT_MIN = 1e-4
# A fine-tuned merge: a residual below the closest siblings' ...
FINETUNED_SHARE = 1.0
# ... and each parent explains on its own (what the fit loses without it) at least this
# many times the unexplained rest ...
UNIQUE_OVER_RESIDUAL = 1.5
# ... and at least this share of the subject. Two separations, each of which alone held
# on 12 random lineage-hard seeds (58 non-merge fits with two or more candidates and a
# residual below the siblings': own share at most 1.43x the residual and at most 0.09 of
# the subject; merges fine-tuned on another task: 1.7x-7.4x and 0.15-0.6).
MIN_OWN_SHARE = 0.12
MIN_SHARE = 0.15
# A near-exact merge (a disguised copy's realignment leaves float noise above the exact
# threshold; a light fine-tune on top): a residual this far below the closest siblings'
# and every parent's own share this many times it accuse whatever that share's size (a
# seed-786234 disguised merge: 0.002 and 174x, its second parent's share 0.10; non-merges
# above: at most 1.43x).
NEAR_EXACT_SHARE = 0.05
NEAR_EXACT_OWN = 20.0
# Sibling parents: the subject's least own share over its residual (and its residual)
# must beat the parents' other siblings fitted on the same parents by this factor ...
STANDOUT = 2.0
# ... and each parent carry more than all that is left unexplained: against that null
# the subject is judged by how far it stands out, not by the absolute UNIQUE_OVER_RESIDUAL
# bar (set without a null; a fine-tune on top leaves siblings' parents little of their own)
SIBLING_OWN_OVER_RESIDUAL = 1.0
# ... candidates aligned this much with a parent share its data's direction ...
SIBLING_COSINE = 0.3
# ... and the per-layer coefficients pass a chi-square consistency test at this level
LAYER_CONSISTENCY = 0.99
# Sparse merges: kept coordinates reproduced exactly, or (DELLA's per-entry 1/p) closely
SPARSE_EXACT = 0.5
SPARSE_EXPLAINED = 0.97
NULL_DESCRIPTION = (
    "homologue pairs of the same base that are not the subject's parents, same-domain "
    "(sibling) pairs included; an exact merge must leave a residual far below theirs"
)


@dataclass(frozen=True)
class FamilyNull:
    """How much of one homologue the closest other explains, over candidate pairs."""

    n_pairs: int
    n_related: int
    sibling_residual: float  # low quantile of 1 - cos^2 over related (same-domain) pairs

    @property
    def exact_threshold(self) -> float:
        return min(EXACT_MAX, max(EXACT_MIN, EXACT_SHARE * self.sibling_residual))


def family_null(
    stack: GramStack,
    indices: Sequence[int],
    null: NullModel,
    *,
    p_threshold: float,
    clone_cosine: float,
) -> FamilyNull:
    """Residual of one candidate after the other, for every candidate pair that is not a
    clone pair; the related (same-domain) ones are the hard negatives that set the bar."""
    gram = stack.total
    related: list[float] = []
    n = 0
    for a_i, a in enumerate(indices):
        for b in indices[a_i + 1:]:
            c = stack.cosine(a, b)
            if abs(c) >= clone_cosine:
                continue
            n += 1
            if gram[a, a] <= 0 or gram[b, b] <= 0:
                continue
            if relatedness(stack, a, b, null).p_value < p_threshold:
                related.append(1.0 - c * c)
    floor = float(np.quantile(related, 0.1)) if related else 1.0
    return FamilyNull(n_pairs=n, n_related=len(related), sibling_residual=floor)


def recipe_residual(
    stack: GramStack, parents: Sequence[int], base: int | None, scale: float | None = None
) -> float:
    """Residual of the subject when each tensor gets its own coefficients: an exact
    linear / task-arithmetic / layer-wise / SLERP merge leaves only rounding. As a share
    of the subject's norm^2, or of ``scale`` (the family's typical task vector) when that
    is smaller: a disguised copy's huge raw task vector must not make a fine-tune-sized
    residual look small."""
    res = tot = 0.0
    for t in range(len(stack.keys)):
        g = stack.tensor_gram[t]
        if g[0, 0] <= 0:
            continue
        members = [j for j in parents if g[j, j] > 0]
        use_base = base if base is not None and g[base, base] > 0 else None
        f = solve(g, members, base=use_base)
        res += f.residual_sq
        tot += f.subject_sq
    if scale is not None and 0 < scale < tot:
        tot = scale
    return res / tot if tot > 0 else 1.0


def typical_norm(stack: GramStack, indices: Sequence[int]) -> float | None:
    """Median squared norm of the candidates' task vectors (the family's scale)."""
    sq = [float(stack.total[j, j]) for j in indices if stack.total[j, j] > 0]
    return float(np.median(sq)) if sq else None


def group_residual(
    stack: GramStack, members: Sequence[int], base: int | None, scale: float | None = None
) -> float:
    """Residual share with one coefficient set per layer group (layer-wise recipes)."""
    res = tot = 0.0
    for g in range(len(stack.groups)):
        gg = stack.gram[g]
        if gg[0, 0] <= 0:
            continue
        f = solve(gg, [j for j in members if gg[j, j] > 0], base=base)
        res += f.residual_sq
        tot += f.subject_sq
    if scale is not None and 0 < scale < tot:
        tot = scale
    return res / tot if tot > 0 else 1.0


def unique_shares(
    gram: np.ndarray, members: Sequence[int], base: int | None, explained: float
) -> list[float]:
    """For each parent, the explained fraction lost when it is left out: what it alone
    contributes. A merge's parents each carry their own share; a sibling's extra "parent"
    only trims a residual the first one leaves."""
    out: list[float] = []
    for m in members:
        rest = [j for j in members if j != m]
        left = solve(gram, rest, base=base).explained_fraction if rest else 0.0
        out.append(max(0.0, explained - left))
    return out


def drop_trimmers(
    gram: np.ndarray, members: Sequence[int], base: int | None
) -> list[int]:
    """Leave out members of a non-exact fit that only trim its residual: a coefficient
    below ``MIN_SHARE`` and less explained on their own than the fit leaves unexplained.
    Forward selection takes such a member in (a published merge of the same parents at
    0.02, say), and one such member would hide that the others are the subject's
    parents; at least two members are kept."""
    kept = list(members)
    while len(kept) > 2:
        f = solve(gram, kept, base=base)
        residual = 1.0 - f.explained_fraction
        fitted = list(f.members)
        own = unique_shares(gram, fitted, base, f.explained_fraction)
        weak = [(u, j) for j, c, u in zip(fitted, f.coefficients, own, strict=True)
                if c < MIN_SHARE and u < residual]
        if not weak:
            break
        kept.remove(min(weak)[1])
    return kept


def own_ratio(gram: np.ndarray, target: int, members: Sequence[int], base: int | None
              ) -> tuple[float, float]:
    """(least own share / residual, residual) of ``target`` fitted on ``members``."""
    f = solve(gram, members, base=base, subject=target)
    residual = max(1.0 - f.explained_fraction, 1e-12)
    least = min(max(0.0, f.explained_fraction - solve(
        gram, [j for j in members if j != m], base=base, subject=target).explained_fraction)
        for m in members)
    return least / residual, residual


@dataclass(frozen=True)
class ParentSiblingNull:
    """The parents' other siblings fitted on the same parents: what a non-merge of their
    data leaves. ``n`` siblings; their best own-share ratio and smallest residual."""

    n: int
    own_ratio: float
    residual: float


def parent_sibling_null(
    stack: GramStack, members: Sequence[int], pool: Sequence[int], base: int | None,
    exact_threshold: float,
) -> ParentSiblingNull | None:
    """None unless the parents are siblings of one another (task vectors aligned far
    beyond chance); else every other candidate aligned with each parent, fitted on the
    parents. An exact combination of the parents is a merge of them, not a sibling."""
    if len(members) < 2 or any(stack.cosine(a, b) < SIBLING_COSINE
                               for i, a in enumerate(members) for b in members[i + 1:]):
        return None
    gram = stack.total
    ratios: list[float] = []
    residuals: list[float] = []
    for k in pool:
        if k in members or gram[k, k] <= 0 or any(
                stack.cosine(k, p) < SIBLING_COSINE for p in members):
            continue
        ratio, residual = own_ratio(gram, k, members, base)
        if residual <= exact_threshold:
            continue
        ratios.append(ratio)
        residuals.append(residual)
    return ParentSiblingNull(len(ratios), max(ratios, default=0.0),
                             min(residuals, default=math.inf))


def layer_consistent(layer_chi: float | None, groups: Iterable[str]) -> bool:
    """Per-layer coefficients (fitted per group; ``groups`` their names, the layers are
    ``layer.*``) within the chi-square quantile of one global recipe."""
    layers = sum(1 for g in groups if g.startswith("layer."))
    if layer_chi is None or layers < 2:
        return False
    dof = layers - 1
    return layer_chi <= float(chi2.ppf(LAYER_CONSISTENCY, dof)) / dof


def _siblings_stand_out(own: float, residual: float, null: ParentSiblingNull | None,
                        consistent: bool) -> bool:
    return (null is not None and null.n > 0 and consistent
            and own >= STANDOUT * null.own_ratio and STANDOUT * residual <= null.residual)


@dataclass(frozen=True)
class DenseVerdict:
    verdict: str  # exact_merge | finetuned_merge | finetune | sibling | none
    accusable: bool
    recipe_residual: float
    residual_ratio: float
    reason: str
    # the least share a parent carries alone, over the unexplained rest (None: not asked)
    own_share: float | None = None


def dense_verdict(
    *,
    n_parents: int,
    coefficients: Sequence[float],
    explained: float,
    recipe_res: float,
    fam: FamilyNull,
    single_finetune: bool,
    own_shares: Sequence[float] = (),
    parents_related: bool = False,
    sibling_null: ParentSiblingNull | None = None,
    layers_consistent: bool = False,
) -> DenseVerdict:
    ratio = (1.0 - explained) / max(fam.sibling_residual, 1e-12)
    if n_parents == 0:
        return DenseVerdict("none", False, 1.0, math.inf, "no candidate explains the subject")
    if recipe_res <= fam.exact_threshold and not single_finetune:
        return DenseVerdict(
            "exact_merge", True, recipe_res, ratio,
            f"the parents reproduce the subject up to {recipe_res:.1e} of its norm^2, below "
            f"{fam.exact_threshold:.1e} (rounding; siblings leave {fam.sibling_residual:.2f})")
    if single_finetune:
        return DenseVerdict("finetune", False, recipe_res, ratio,
                            "the parent's whole task vector is kept and extended")
    # rows and layers are not asked: a fine-tune on top of the merge moves them unevenly
    residual = max(1.0 - explained, 1e-12)
    least = min(own_shares, default=0.0)
    own = least / residual
    shares_ok = (n_parents >= 2 and ratio <= FINETUNED_SHARE
                 and min(coefficients) >= MIN_SHARE)
    recipe_like = shares_ok and own >= UNIQUE_OVER_RESIDUAL
    if recipe_like and least >= MIN_OWN_SHARE:
        return DenseVerdict(
            "finetuned_merge", True, recipe_res, ratio,
            f"residual {ratio:.2f} of the closest siblings'; each parent carries a share of "
            f"its own at least {own:.1f} times the unexplained rest"
            + (" (the parents are related to one another)" if parents_related else "")
            + ": a merge fine-tuned further", own_share=own)
    if shares_ok and ratio <= NEAR_EXACT_SHARE and own >= NEAR_EXACT_OWN:
        return DenseVerdict(
            "finetuned_merge", True, recipe_res, ratio,
            f"the parents leave {residual:.1e} of the subject unexplained ({ratio:.3f} of "
            f"the closest siblings' residual) and each carries a share of its own {own:.0f} "
            "times that rest: a merge, up to realignment rounding or a light fine-tune",
            own_share=own)
    sib = sibling_null
    if shares_ok and own >= SIBLING_OWN_OVER_RESIDUAL and sib is not None and \
            _siblings_stand_out(own, residual, sib, layers_consistent):
        return DenseVerdict(
            "finetuned_merge", True, recipe_res, ratio,
            f"the parents are siblings of one another: each carries a share of its own "
            f"{own:.1f} times the unexplained rest ({least:.2f} of the subject), against at "
            f"most {sib.own_ratio:.2f} for {sib.n} other sibling(s) of theirs fitted on them, "
            f"whose residuals ({sib.residual:.2f} or more) are {sib.residual / residual:.0f} "
            "times the subject's; per-layer coefficients are one recipe: a merge of "
            "siblings fine-tuned further", own_share=own)
    why = []
    if ratio > FINETUNED_SHARE:
        why.append(f"residual {ratio:.2f} of the closest siblings' (as large as a sibling's)")
    if n_parents < 2:
        why.append("one partial parent only")
    else:
        if own < UNIQUE_OVER_RESIDUAL or least < MIN_OWN_SHARE:
            why.append(f"a parent's own share is only {least:.2f} of the subject, {own:.1f} "
                       "times the unexplained rest (it trims a residual, it is no "
                       "ingredient)")
        if parents_related:
            why.append("the parents are related to one another")
        if sibling_null is not None and least < MIN_OWN_SHARE:
            why.append(f"against {sibling_null.n} other sibling(s) of the parents (own "
                       f"shares up to {sibling_null.own_ratio:.2f} times their residual, "
                       f"residuals from {sibling_null.residual:.2f}) it does not stand out"
                       + ("" if layers_consistent else
                          ", or its per-layer coefficients are no single recipe"))
    if min(coefficients) < MIN_SHARE:
        why.append(f"a parent's coefficient is below {MIN_SHARE}")
    return DenseVerdict("sibling", False, recipe_res, ratio,
                        "not enough to accuse: " + "; ".join(why or ["no recipe fits"]),
                        own_share=own if n_parents >= 2 else None)


def sparse_accusable(exact_fraction: float, explained: float) -> bool:
    return exact_fraction >= SPARSE_EXACT or explained >= SPARSE_EXPLAINED


__all__ = [
    "NULL_DESCRIPTION",
    "DenseVerdict",
    "FamilyNull",
    "ParentSiblingNull",
    "dense_verdict",
    "drop_trimmers",
    "family_null",
    "group_residual",
    "layer_consistent",
    "own_ratio",
    "parent_sibling_null",
    "recipe_residual",
    "sparse_accusable",
    "typical_norm",
    "unique_shares",
]
