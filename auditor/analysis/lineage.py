"""Lineage of a subject among candidates: clones, merge / fine-tune parents, siblings.

Pipeline (all from fingerprints, see ``fingerprint``):
1. Gram matrices of subject, candidates and base weights (``similarity``);
2. a null from candidate pairs (homologues of one base): calibrated z-score and p-value of
   every subject/candidate pair (``calibration``), and the family's sibling residuals
   (``verdicts.family_null``);
3. clones (``clones``); clone groups among the candidates collapse to their oldest member;
4. parents: a sparse subject (far more exact zeros than any fine-tune: TIES, DARE,
   Breadcrumbs, DELLA) is fitted coordinate by coordinate (``sparse_fit``), and so is one
   with a few extra zeros whose kept coordinates candidates reproduce exactly
   (``kept_reproduced``); a dense one by forward-selected NNLS plus a base term;
5. the verdict (``verdicts``): only an exact combination, a sparse merge whose kept
   coordinates the parents reproduce, or a merge fine-tuned further with recipe-like
   shares is a merge and may accuse; a fit that merely explains a share of the subject
   (a same-data sibling) makes the candidate a ``sibling``;
6. disguised sources carry their raw print; the analysis runs again in that frame, so a
   merge that took a disguised copy in as published is attributed to it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import combinations

import numpy as np
from threadpoolctl import threadpool_limits

from auditor.analysis.attribution import (
    Attribution,
    attribute,
    merged_member_expansion,
    select_parents,
    select_parents_on,
    solve,
)
from auditor.analysis.calibration import NullModel, Relatedness, fit_null, relatedness
from auditor.analysis.clones import clone_groups, identifiable_keys, is_clone
from auditor.analysis.exact_sets import (
    complete_exact,
    exact_search,
    merged_not_copied,
    prune_exact,
)
from auditor.analysis.fingerprint import Fingerprint
from auditor.analysis.signatures import (
    METHOD_REGISTRY,
    guess_method,
    is_sparse,
    merge_signatures,
    row_uniformity,
)
from auditor.analysis.similarity import GramStack, build_gram, cosine_report
from auditor.analysis.sparse_fit import (
    ROUTED_EXACT,
    fit_sparse,
    profile_signatures,
    recipe_coefficients,
)
from auditor.analysis.sparse_screen import kept_reproduced
from auditor.analysis.verdicts import (
    NULL_DESCRIPTION,
    FamilyNull,
    dense_verdict,
    drop_trimmers,
    family_null,
    layer_consistent,
    parent_sibling_null,
    recipe_residual,
    sparse_accusable,
    typical_norm,
    unique_shares,
)
from auditor.errors import AnalysisError
from auditor.schema import LineageEntry, LineageEvidence, MergeInfo, Relation

# Task vectors this aligned share a direction far beyond chance at any model size (chance
# cosines are ~1/sqrt(d)): related even when the calibrated null is inflated by siblings
SHARED_COSINE = 0.3
SUBJECT = "\x00subject"
BASE = "\x00base"


@dataclass(frozen=True)
class LineageResult:
    entries: list[LineageEntry]
    merge: MergeInfo
    attribution: Attribution | None = None
    relatedness: dict[str, Relatedness] = field(default_factory=dict)
    null: NullModel | None = None
    family: FamilyNull | None = None

    def entry(self, repo_id: str) -> LineageEntry | None:
        return next((e for e in self.entries if e.repo_id == repo_id), None)

    def parents(self) -> list[str]:
        return [
            e.repo_id for e in self.entries if e.relation in ("merge_parent", "finetune_parent")
        ]

    def clones(self) -> list[str]:
        return [e.repo_id for e in self.entries if e.relation == "clone"]


def subject_is_derivative_of_candidate(result: LineageResult, repo_id: str) -> bool:
    """True when the subject was made from ``repo_id`` (clone, merge or further fine-tune)."""
    e = result.entry(repo_id)
    return e is not None and e.relation in ("clone", "merge_parent", "finetune_parent")


@dataclass(frozen=True)
class _Options:
    p_threshold: float
    clone_cosine: float
    clone_norm_tolerance: float
    min_gain: float
    min_z: float
    max_row_z2: float


def analyze_lineage(
    subject: Fingerprint,
    candidates: Mapping[str, Fingerprint],
    *,
    declared_parents: Collection[str] = (),
    base_fingerprint: Fingerprint | None = None,
    subject_aligned: bool = False,
    revisions: Mapping[str, str] | None = None,
    null_pairs: Sequence[tuple[str, str]] | None = None,
    p_threshold: float = 1e-3,
    clone_cosine: float = 0.99,
    clone_norm_tolerance: float = 0.05,
    # A parent must explain at least 5% of the subject's task vector: siblings on related
    # tasks share a few percent by chance of their data (e.g. two arithmetic-like tasks).
    min_gain: float = 0.05,
    min_z: float = 5.0,
    created_at: Mapping[str, datetime] | None = None,
    max_row_z2: float = 4.0,
) -> LineageResult:
    """Relate ``subject`` (a task-vector fingerprint) to every candidate.

    ``base_fingerprint`` is a fingerprint of the base *weights* (``fingerprint_weights``):
    it adds the base term of the fit (needed for SLERP and unnormalised linear merges).
    ``null_pairs`` names candidate pairs known to be unrelated homologues; by default every
    candidate pair is used and related ones are clipped out robustly.
    ``created_at`` (repo creation times; else a fingerprint's ``meta["created_at"]``) picks
    the original among clones: the oldest is the representative, the rest are ``related``.
    ``max_row_z2`` bounds how much a parent's per-row coefficient may vary within a tensor
    (mean squared z-score, ~1-3 for a true parent) for a fine-tuned merge verdict.
    """
    opts = _Options(p_threshold, clone_cosine, clone_norm_tolerance, min_gain, min_z,
                    max_row_z2)
    # Every BLAS call here is small (samples x models): threaded OpenBLAS only spins against
    # the other threads and workers (50 homologues on a busy machine: 23 s -> 0.3 s).
    with threadpool_limits(limits=1, user_api="blas"):
        return _analyze_frames(subject, candidates, base_fingerprint, declared_parents,
                               revisions, created_at, null_pairs, subject_aligned, opts)


def _analyze_frames(subject: Fingerprint, candidates: Mapping[str, Fingerprint],
                    base_fingerprint: Fingerprint | None, declared_parents: Collection[str],
                    revisions: Mapping[str, str] | None,
                    created_at: Mapping[str, datetime] | None,
                    null_pairs: Sequence[tuple[str, str]] | None, subject_aligned: bool,
                    opts: _Options) -> LineageResult:
    ctx = _Frame(set(declared_parents), dict(revisions or {}), created_at, null_pairs,
                 subject_aligned, "aligned", frozenset())
    result = _analyze(subject, candidates, base_fingerprint, ctx, opts)
    disguised = frozenset(n for n, fp in candidates.items() if fp.raw is not None)
    if subject.raw is None and not disguised:
        return result
    # the disguised frame: weights as published, disguised sources included as they are
    raw = _analyze(subject.raw or subject, {n: fp.raw or fp for n, fp in candidates.items()},
                   base_fingerprint, replace_frame(ctx, subject.raw is None and subject_aligned,
                                                   disguised), opts)
    if _accusable(raw) and (not _accusable(result) or _explained(raw) > _explained(result)):
        return raw
    return result


def _accusable(r: LineageResult) -> bool:
    return r.merge.is_merge and any(e.accusable for e in r.entries)


def _explained(r: LineageResult) -> float:
    return r.merge.explained_fraction or 0.0


@dataclass(frozen=True)
class _Frame:
    declared: set[str]
    revisions: dict[str, str]
    created_at: Mapping[str, datetime] | None
    null_pairs: Sequence[tuple[str, str]] | None
    subject_aligned: bool
    name: str
    disguised: frozenset[str]


def replace_frame(ctx: _Frame, aligned: bool, disguised: frozenset[str]) -> _Frame:
    return _Frame(ctx.declared, ctx.revisions, ctx.created_at, ctx.null_pairs, aligned, "raw",
                  disguised)


def _analyze(
    subject: Fingerprint,
    candidates: Mapping[str, Fingerprint],
    base_fingerprint: Fingerprint | None,
    ctx: _Frame,
    o: _Options,
) -> LineageResult:
    if not candidates:
        return LineageResult(entries=[], merge=MergeInfo(is_merge=False))
    skeys = set(subject.keys())
    usable: dict[str, Fingerprint] = {}
    entries: list[LineageEntry] = []
    for name, fp in candidates.items():
        if len(set(subject.common_keys(fp))) >= 0.5 * len(skeys):
            usable[name] = fp
            continue
        # another architecture or vocabulary: compare what is shared, call it unrelated
        try:
            c = cosine_report(subject, fp).cosine
        except AnalysisError:
            c = 0.0
        entries.append(LineageEntry(repo_id=name, revision=ctx.revisions.get(name),
                                    relation="unrelated", cosine=c, aligned=ctx.subject_aligned,
                                    declared=name in ctx.declared))
    if not usable:
        return LineageResult(entries=entries, merge=MergeInfo(is_merge=False))

    items: list[tuple[str, Fingerprint]] = [(SUBJECT, subject), *usable.items()]
    if base_fingerprint is not None:
        items.append((BASE, base_fingerprint))
    keys = sorted(set.intersection(*(set(subject.common_keys(fp)) for _, fp in items)))
    stack = build_gram(items, keys=keys)
    names = list(usable)
    cidx = {n: stack.index(n) for n in names}
    base_i = stack.index(BASE) if base_fingerprint is not None else None

    if ctx.null_pairs is not None:
        pairs = [(cidx[a], cidx[b]) for a, b in ctx.null_pairs if a in cidx and b in cidx]
    else:
        pairs = list(combinations(sorted(cidx.values()), 2))
    null = fit_null(stack, pairs)
    rel = {n: relatedness(stack, 0, cidx[n], null) for n in names}

    ident = identifiable_keys(stack)
    clones = {n for n in names
              if is_clone(stack, 0, cidx[n], ident, o.clone_cosine, o.clone_norm_tolerance)}
    copies = clone_groups(stack, [n for n in names if n not in clones], cidx, ident,
                          o.clone_cosine, o.clone_norm_tolerance, usable, ctx.created_at)
    shadowed = {c for group in copies.values() for c in group}
    copy_of = {c: rep for rep, group in copies.items() for c in group}
    fitted = [n for n in names if n not in clones and n not in shadowed]
    fam = family_null(stack, [cidx[n] for n in fitted], null, p_threshold=o.p_threshold,
                      clone_cosine=o.clone_cosine)
    merged = merged_not_copied(stack, clones, fitted, cidx, base_i, fam.exact_threshold)
    if merged:
        clones -= merged
        fitted = [n for n in names if n not in clones and n not in shadowed]

    typical_zero = float(np.median([fp.zero_fraction for fp in usable.values()]))
    args = (subject, usable, fitted, rel, keys, base_fingerprint, stack, cidx, base_i)
    if subject.zero_fraction > typical_zero + 0.05:
        fit = _sparse(*args)
    else:
        fit = _dense(*args, fam, o, null)
        # a few extra zeros only (three parents, each trimmed): the kept coordinates decide
        if not fit.accusable and subject.zero_fraction > typical_zero and kept_reproduced(
                subject, usable, keys=keys, order=fitted, base=base_fingerprint):
            fit = _sparse(*args, fallback=fit)
    derived = _derived_from_subject(stack, [cidx[n] for n in fitted], base_i,
                                    fam.exact_threshold, rel, o.p_threshold)
    if fit.verdict == "finetune" and set(fit.parents) & derived:
        # the "parent" is an exact mix that holds the subject (a merge made from it, e.g.
        # with a same-data sibling): the child, not the parent
        fit.verdict, fit.reason = "derived", (
            "the candidate is a combination that includes the subject: made from it")
    parents = fit.parents if fit.accusable or fit.verdict == "finetune" else []

    evidence = LineageEvidence(
        verdict=fit.verdict, explained_fraction=fit.explained, residual_ratio=fit.ratio,
        recipe_residual=fit.recipe_res, exact_fraction=fit.exact, layer_consistency=fit.layer_chi,
        row_uniformity=max(fit.row_z2.values(), default=None), method=fit.method,
        parent_own_share=fit.own_share,
        frame=ctx.name, null=NULL_DESCRIPTION, null_pairs=fam.n_pairs,
        null_related_pairs=fam.n_related, sibling_residual=fam.sibling_residual,
        accusable=fit.accusable, reason=fit.reason,
    )
    is_merge = bool(parents) and fit.accusable
    for n in names:
        r = rel[n]
        coef: float | None = None
        per_coef: dict[str, float] = {}
        ev: LineageEvidence | None = None
        relation: Relation
        if n in clones:
            relation = "clone"
        elif n in parents:
            relation = "merge_parent" if is_merge else "finetune_parent"
            coef = fit.coefficients[n]
            per_coef = fit.per_layer.get(n, {})
            ev = evidence
        elif r.p_value < o.p_threshold:
            # a re-upload of another candidate (shadowed, ``copy_of``) lets its original
            # speak for it: related by the same evidence, never a parent itself
            relation = "related" if n in derived or n in shadowed else "sibling"
            if n in fit.parents:
                ev = evidence  # the fit that was not enough to accuse
        else:
            relation = "unrelated"
        entries.append(LineageEntry(
            repo_id=n, revision=ctx.revisions.get(n), relation=relation, coefficient=coef,
            cosine=r.cosine, p_value=r.p_value, z_score=r.z_score,
            aligned=ctx.subject_aligned, declared=n in ctx.declared, copy_of=copy_of.get(n),
            per_layer_cosine=r.per_group_cosine, per_layer_coefficient=per_coef,
            accusable=relation == "merge_parent" and fit.accusable,
            source_disguised=n in ctx.disguised and relation == "merge_parent",
            evidence=ev,
        ))
    entries.sort(key=lambda e: (_RANK[e.relation], -(e.z_score or 0.0)))
    merge = MergeInfo(
        is_merge=is_merge,
        method=fit.method if is_merge else None,
        explained_fraction=fit.explained if fit.parents else None,
        residual_fraction=1.0 - fit.explained if fit.parents else None,
        base_coefficient=fit.base_coefficient if fit.parents else None,
        layerwise=fit.layerwise if is_merge else None,
        signatures=fit.signatures,
    )
    return LineageResult(entries=entries, merge=merge, attribution=fit.attribution,
                         relatedness=rel, null=null, family=fam)


_RANK = {"clone": 0, "merge_parent": 1, "finetune_parent": 1, "sibling": 2, "related": 2,
         "unrelated": 3}


@dataclass
class _Fit:
    parents: list[str]
    coefficients: dict[str, float]
    verdict: str = "none"
    accusable: bool = False
    explained: float = 0.0
    ratio: float | None = None
    recipe_res: float | None = None
    exact: float | None = None
    layer_chi: float | None = None
    own_share: float | None = None
    row_z2: dict[str, float] = field(default_factory=dict)
    method: str | None = None
    reason: str = ""
    base_coefficient: float | None = None
    layerwise: bool = False
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)
    signatures: dict[str, float] = field(default_factory=dict)
    attribution: Attribution | None = None


def _sparse(
    subject: Fingerprint, usable: Mapping[str, Fingerprint], fitted: Sequence[str],
    rel: Mapping[str, Relatedness], keys: Sequence[str], base_fp: Fingerprint | None,
    stack: GramStack, cidx: Mapping[str, int], base_i: int | None, fallback: _Fit | None = None,
) -> _Fit:
    """A trimmed / dropped merge: parents by the kept coordinates they reproduce. Routed
    here by the exact screen alone (``fallback``: the dense fit), nearly every kept
    coordinate must be reproduced exactly (``ROUTED_EXACT``), else the dense fit stands."""
    order = sorted(fitted, key=lambda n: -abs(stack.cosine(0, cidx[n])))
    sf = fit_sparse(subject, usable, keys=keys, order=order, base=base_fp)
    if not sf.parents:
        return fallback or _Fit([], {}, reason="no candidate reproduces the kept coordinates")
    eff = dict(zip(sf.parents, sf.coefficients, strict=True))
    sigs = merge_signatures(subject, {p: usable[p] for p in sf.parents}, eff, keys=keys)
    if sf.conflict_both is not None:
        # read off the coordinate assignment: opposite-signed parents never both kept
        sigs["sign_election"] = 1.0 if sf.conflict_both < 0.02 else 0.0
    # how each parent's entries were kept (by rank or at random, flat or graded) decides
    # the rescaling; the coefficients never depend on the method name picked below
    sigs.update(profile_signatures(sf))
    method = guess_method(sigs, coefficients=sf.coefficients) or _fallback_method(sf.rescale)
    coefs = recipe_coefficients(sf)
    sigs.update(exact_fraction=sf.exact_fraction, explained_nonzero=sf.explained)
    sigs.update({f"null_gap:{p}": g for p, g in zip(sf.parents, sf.null_gaps, strict=True)})
    ok = sparse_accusable(sf.exact_fraction, sf.explained) if fallback is None else (
        sf.exact_fraction >= ROUTED_EXACT)
    if fallback is not None and not ok:
        return fallback
    reason = (f"{subject.zero_fraction:.0%} exact zeros; the parents reproduce "
              f"{sf.exact_fraction:.0%} of the kept coordinates exactly, R^2 {sf.explained:.3f}")
    return _Fit(
        list(sf.parents), dict(zip(sf.parents, coefs, strict=True)),
        verdict="sparse_merge" if ok else "sibling", accusable=ok, explained=sf.explained,
        exact=sf.exact_fraction, method=method,
        reason=reason if ok else "not enough to accuse: " + reason, signatures=sigs,
    )


def _fallback_method(rescale: str) -> str:
    """The first sparse method of the registry with this rescaling."""
    return next((m.name for m in METHOD_REGISTRY.values() if m.sparse and m.rescale == rescale),
                "dare_linear")


def _dense(
    subject: Fingerprint, usable: Mapping[str, Fingerprint], fitted: Sequence[str],
    rel: Mapping[str, Relatedness], keys: Sequence[str], base_fp: Fingerprint | None,
    stack: GramStack, cidx: Mapping[str, int], base_i: int | None, fam: FamilyNull,
    o: _Options, null: NullModel,
) -> _Fit:
    """Forward-selected NNLS, then the verdict: exact, fine-tuned merge, or sibling."""
    # every homologue may be a parent: the verdict, not the p-value, decides (a family
    # rich in siblings inflates the null and hides true parents from a p-value gate)
    pool = [cidx[n] for n in fitted]
    scale = typical_norm(stack, pool)
    sel = select_parents(stack, pool, null=None, base=base_i, min_gain=o.min_gain,
                         min_z=o.min_z)
    sel = merged_member_expansion(stack, sel, pool, base=base_i)
    members = list(sel.members)
    if not members or recipe_residual(stack, members, base_i, scale) > fam.exact_threshold:
        exact = complete_exact(stack, members, pool, base_i, scale, fam.exact_threshold) \
            or exact_search(stack, pool, base=base_i, threshold=fam.exact_threshold, scale=scale)
        members = exact if exact is not None else drop_trimmers(stack.total, members, base_i)
    else:
        members = prune_exact(stack, members, base_i, scale, fam.exact_threshold)
    if not members:
        return _Fit([], {}, reason="no candidate explains a share of the subject")
    attribution = attribute(stack, members, base=base_i)
    afit = attribution.fit
    pnames = [stack.names[j] for j in members]
    coefs = {n: afit.coefficient_of(cidx[n]) for n in pnames}
    sigs = merge_signatures(subject, {n: usable[n] for n in pnames}, coefs,
                            base_weights=base_fp, base_coefficient=afit.base_coefficient,
                            keys=keys)
    base_gain = 0.0
    if base_i is not None:
        base_gain = afit.explained_fraction - solve(stack.total, members).explained_fraction
    sigs.update(base_gain=base_gain, explained_all=afit.explained_fraction,
                layerwise_score=attribution.layerwise_score)
    method = guess_method(sigs, coefficients=list(afit.coefficients),
                          base_coefficient=afit.base_coefficient, base_gain=base_gain,
                          layerwise=attribution.layerwise)
    rows = row_uniformity(subject, {n: usable[n] for n in pnames}, coefs,
                          base_weights=base_fp, base_coefficient=afit.base_coefficient,
                          keys=keys)
    sigs.update({f"rows:{n}": v for n, v in rows.items()})
    single_ft = False
    if len(members) == 1:
        c, j = afit.coefficients[0], members[0]
        # a further fine-tune keeps the parent's task vector whole (coefficient ~1) and
        # adds an independent update, so the subject's task vector is the longer one
        single_ft = (0.85 <= c <= 1.15 and stack.total[j, j] <= 1.05 * stack.total[0, 0]
                     and afit.explained_fraction >= 1.0 - 0.5 * fam.sibling_residual
                     and rows.get(pnames[0], 0.0) <= o.max_row_z2)
    parents_related = len(members) >= 2 and all(
        relatedness(stack, a, b, null).p_value < o.p_threshold
        for i, a in enumerate(members) for b in members[i + 1:])
    v = dense_verdict(
        own_shares=unique_shares(stack.total, members, base_i, afit.explained_fraction),
        parents_related=parents_related, n_parents=len(members), fam=fam,
        coefficients=list(afit.coefficients), explained=afit.explained_fraction,
        recipe_res=recipe_residual(stack, members, base_i, scale), single_finetune=single_ft,
        sibling_null=parent_sibling_null(stack, members, pool, base_i, fam.exact_threshold),
        layers_consistent=layer_consistent(attribution.layerwise_score, attribution.per_group))
    per_layer = {n: {g: f.coefficient_of(cidx[n]) for g, f in attribution.per_group.items()}
                 for n in pnames}
    return _Fit(
        pnames, coefs, verdict=v.verdict, accusable=v.accusable,
        explained=afit.explained_fraction, ratio=v.residual_ratio, recipe_res=v.recipe_residual,
        layer_chi=attribution.layerwise_score, row_z2=rows, own_share=v.own_share,
        method=method if v.accusable else None, reason=v.reason,
        base_coefficient=afit.base_coefficient, layerwise=attribution.layerwise,
        per_layer=per_layer, signatures=sigs, attribution=attribution,
    )


def _derived_from_subject(
    stack: GramStack, others: Sequence[int], base: int | None, threshold: float,
    rel: Mapping[str, Relatedness], p_threshold: float,
) -> set[str]:
    """Related candidates that are themselves (near-)exact combinations including the
    subject: merges made from it, not siblings of it."""
    out: set[str] = set()
    gram = stack.total
    related = [j for j in others if rel[stack.names[j]].p_value < p_threshold
               or abs(stack.cosine(0, j)) >= SHARED_COSINE]
    for j in related:
        pool = [0, *(k for k in others if k != j)]
        f = select_parents_on(gram, j, pool, base=base, min_coefficient=0.02)
        if 0 in f.members and 1.0 - f.explained_fraction <= max(threshold, 1e-3) * 5:
            out.add(stack.names[j])
    return out


__all__ = ["LineageResult", "analyze_lineage", "is_sparse", "subject_is_derivative_of_candidate"]
