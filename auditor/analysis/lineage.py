"""Lineage of a subject model among candidates: clones, merge parents, fine-tune parents.

Pipeline (all from fingerprints, see ``fingerprint``):
1. Gram matrices of subject, candidates and (optionally) the base weights (``similarity``);
2. a null from pairs of candidates (homologues of one base), and a calibrated z-score and
   p-value of every subject/candidate pair (``calibration``);
3. clones: task vectors nearly identical (cosine > 0.99, norm ratio ~1); clone groups
   among the candidates are collapsed to one representative (the oldest repo) before any
   fit, because a parent and its re-upload explain the subject equally well;
4. parents: forward-selected NNLS fit of the subject on the significant candidates plus a
   signed base term (``attribution``); a selected candidate that is itself a merge of other
   candidates is replaced by them (the primitive explanation); a candidate whose
   per-tensor coefficients are not uniform within a layer is a correlated sibling, not a
   parent, and is reported as ``related``;
5. method-aware refit: TIES / DARE coefficients are refitted coordinate by coordinate on
   the subsets of parents that survived trimming, dropping and the sign election;
6. relations and the merge summary (``signatures`` guesses the method).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import combinations

import numpy as np

from auditor.analysis.attribution import (
    Attribution,
    Fit,
    Variant,
    attribute,
    merged_member_expansion,
    residual_cosine,
    select_parents,
    solve,
    subset_refit,
)
from auditor.analysis.calibration import NullModel, Relatedness, fit_null, relatedness
from auditor.analysis.fingerprint import Fingerprint
from auditor.analysis.signatures import guess_method, merge_signatures, row_uniformity
from auditor.analysis.similarity import GramStack, build_gram, cosine_report
from auditor.errors import AnalysisError
from auditor.schema import LineageEntry, MergeInfo, Relation

SUBJECT = "\x00subject"
BASE = "\x00base"


@dataclass(frozen=True)
class LineageResult:
    entries: list[LineageEntry]
    merge: MergeInfo
    attribution: Attribution | None = None
    relatedness: dict[str, Relatedness] = field(default_factory=dict)
    null: NullModel | None = None

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


def _sparse_variant(subject: Fingerprint, candidates: Mapping[str, Fingerprint]) -> bool:
    zf = max((fp.zero_fraction for fp in candidates.values()), default=0.0)
    return subject.zero_fraction > zf + 0.05


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
    (mean squared z-score, ~1-3 for a true parent); beyond it the candidate is a correlated
    sibling (``related``), see ``signatures.row_uniformity``.
    """
    revisions = dict(revisions or {})
    declared = set(declared_parents)
    if not candidates:
        return LineageResult(entries=[], merge=MergeInfo(is_merge=False))
    skeys = set(subject.keys())
    usable: dict[str, Fingerprint] = {}
    dropped: dict[str, Fingerprint] = {}
    for name, fp in candidates.items():
        shared = set(subject.common_keys(fp))
        (usable if len(shared) >= 0.5 * len(skeys) else dropped)[name] = fp
    entries: list[LineageEntry] = []
    for name, fp in dropped.items():
        # another architecture or vocabulary: compare what is shared, call it unrelated
        try:
            c = cosine_report(subject, fp).cosine
        except AnalysisError:
            c = 0.0
        entries.append(_entry(name, "unrelated", c, revisions, declared, subject_aligned))
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

    if null_pairs is not None:
        pairs = [(cidx[a], cidx[b]) for a, b in null_pairs if a in cidx and b in cidx]
    else:
        pairs = list(combinations(sorted(cidx.values()), 2))
    null = fit_null(stack, pairs)
    rel = {n: relatedness(stack, 0, cidx[n], null) for n in names}

    # clones: same direction and same length
    sub_sq = float(stack.total[0, 0])
    ident = _identifiable_keys(stack)
    clones = {n for n in names if _is_clone(stack, 0, cidx[n], ident, clone_cosine,
                                            clone_norm_tolerance)}
    # clone groups among the candidates: only the oldest member takes part in the fit
    copies = _clone_groups(stack, [n for n in names if n not in clones], cidx, ident,
                           clone_cosine, clone_norm_tolerance, usable, created_at)
    shadowed = {c for group in copies.values() for c in group}
    copy_of = {c: rep for rep, group in copies.items() for c in group}

    eligible = [
        cidx[n]
        for n in names
        if n not in clones and n not in shadowed and rel[n].p_value < p_threshold
    ]
    others = [cidx[n] for n in names if n not in clones and n not in shadowed]
    row_z2: dict[str, float] = {}
    # a fit that needs a *negative* share of some candidate picked a sibling merge or a
    # descendant of the subject: drop the members carrying that candidate and reselect;
    # when nothing is left the subject is the ancestor (its "parents" are only related)
    excluded: set[int] = set()
    reversed_ = False
    # TIES / DARE trim or drop coordinates per tensor at random or by magnitude: their
    # per-tensor coefficients are not uniform, so the sibling test is not applied to them
    # (judged against the typical candidate: some candidates are sparse merges themselves)
    typical_zero = float(np.median([fp.zero_fraction for fp in usable.values()]))
    sparse_subject = subject.zero_fraction > typical_zero + 0.05
    for _ in range(4):
        pool = [j for j in eligible if j not in excluded]
        sel = select_parents(stack, pool, null=null, base=base_i, min_gain=min_gain, min_z=min_z)
        sel = merged_member_expansion(stack, sel, pool, base=base_i)
        if not sparse_subject:
            sel, rows = _drop_siblings(subject, usable, stack, sel, base_i, base_fingerprint,
                                       keys, max_row_z2)
            row_z2.update(rows)
        offending = _reversed(stack, sel, others, base_i, null, min_z) if sel.members else []
        reversed_ = bool(offending)
        if not reversed_:
            break
        carriers = {m for m in sel.members for j in offending if stack.cosine(m, j) > 0.1} or set(
            sel.members
        )
        excluded |= carriers
    parents = [] if reversed_ else list(sel.members)
    # sparse relative to the chosen parents (other candidates may be sparse merges too)
    sparse = _sparse_variant(subject, {stack.names[i]: usable[stack.names[i]] for i in parents})

    # method-aware refit: TIES/DARE-TIES fits on the coordinates that won the sign
    # election; the signatures decide which
    attribution = attribute(stack, parents, base=base_i, variant="all")
    sigs: dict[str, float] = {}
    method: str | None = None
    if parents:
        pnames = [stack.names[i] for i in parents]
        pfps = {n: usable[n] for n in pnames}
        coefs = {n: attribution.fit.coefficient_of(cidx[n]) for n in pnames}
        sigs = merge_signatures(
            subject,
            pfps,
            coefs,
            base_weights=base_fingerprint,
            base_coefficient=attribution.fit.base_coefficient,
            keys=keys,
        )
        base_gain = 0.0
        if base_i is not None:
            nobase = solve(stack.total, parents)
            base_gain = attribution.fit.explained_fraction - nobase.explained_fraction
        sigs["base_gain"] = base_gain
        sigs["explained_all"] = attribution.fit.explained_fraction
        method = guess_method(
            sigs,
            coefficients=list(attribution.fit.coefficients),
            base_coefficient=attribution.fit.base_coefficient,
            base_gain=base_gain,
        )
        if not sparse and method in ("ties", "dare_ties", "dare_linear"):
            method = "task_arithmetic"
        variant: Variant | None = None
        if method == "ties":
            variant = "agree"
        if variant is not None:
            attribution = attribute(stack, parents, base=base_i, variant=variant)
        if attribution.layerwise and method in ("linear", "task_arithmetic"):
            method = "layerwise"  # one coefficient per layer: mergekit gradients
        if sparse and method in ("ties", "dare_ties", "dare_linear"):
            attribution = _sparse_refit(subject, pfps, attribution, keys, method)
        sigs["layerwise_score"] = attribution.layerwise_score
        sigs.update({f"rows:{n}": v for n, v in row_z2.items() if n in pfps})

    fit = attribution.fit
    n_par = len(parents)
    single_ft = False
    if n_par == 1 and not sparse:
        c = fit.coefficients[0]
        j = parents[0]
        # a further fine-tune keeps the parent's task vector whole (coefficient ~1) and
        # adds an independent update, so the subject's task vector is the longer one
        single_ft = 0.85 <= c <= 1.15 and stack.total[j, j] <= 1.05 * sub_sq
    is_merge = bool(parents) and not reversed_ and not single_ft

    for n in names:
        j = cidx[n]
        r = rel[n]
        coef: float | None = None
        per_coef: dict[str, float] = {}
        relation: Relation
        if n in clones:
            relation = "clone"
        elif j in parents and not reversed_:
            relation = "finetune_parent" if single_ft else "merge_parent"
            coef = fit.coefficient_of(j)
            per_coef = {g: f.coefficient_of(j) for g, f in attribution.per_group.items()}
        elif r.p_value < p_threshold:
            # A re-upload of another candidate (shadowed) lets its original speak for it,
            # but is judged by the same p-value: identical evidence, identical relation.
            relation = "related"
        else:
            relation = "unrelated"
        entries.append(
            LineageEntry(
                repo_id=n,
                revision=revisions.get(n),
                relation=relation,
                coefficient=coef,
                cosine=r.cosine,
                p_value=r.p_value,
                z_score=r.z_score,
                aligned=subject_aligned,
                declared=n in declared,
                copy_of=copy_of.get(n),
                per_layer_cosine=r.per_group_cosine,
                per_layer_coefficient=per_coef,
            )
        )
    entries.sort(key=lambda e: (_RANK[e.relation], -(e.z_score or 0.0)))
    merge = MergeInfo(
        is_merge=is_merge,
        method=method if is_merge else None,
        explained_fraction=fit.explained_fraction if parents else None,
        residual_fraction=fit.residual_fraction if parents else None,
        base_coefficient=fit.base_coefficient if parents else None,
        layerwise=attribution.layerwise if is_merge else None,
        signatures=sigs,
    )
    return LineageResult(
        entries=entries,
        merge=merge,
        attribution=attribution if parents else None,
        relatedness=rel,
        null=null,
    )


_RANK = {"clone": 0, "merge_parent": 1, "finetune_parent": 1, "related": 2, "unrelated": 3}


def _reversed(
    stack: GramStack,
    fit: Fit,
    eligible: Sequence[int],
    base: int | None,
    null: NullModel,
    min_z: float,
) -> list[int]:
    """True when the fit needs a *negative* contribution of another candidate: the
    subject is then an ancestor of the selected "parents" (e.g. A against the merge
    M = (A + B) / 2 with B among the candidates: A = 2M - B), not their descendant."""
    gram = stack.total
    if fit.residual_sq <= 1e-12 * max(fit.subject_sq, 1e-300):
        return []
    sd_extra = float(np.sqrt(np.average(null.spread**2, weights=stack.numel)))
    out: list[int] = []
    for j in eligible:
        if j in fit.members:
            continue
        rc = residual_cosine(gram, fit, j, base)
        sd = math.sqrt(stack.null_variance(0, j) + sd_extra**2)
        if rc / max(sd, 1e-12) < -min_z and rc < -0.2:
            out.append(j)
    return out


def _entry(
    name: str,
    relation: Relation,
    cosine: float,
    revisions: Mapping[str, str],
    declared: set[str],
    aligned: bool,
) -> LineageEntry:
    return LineageEntry(
        repo_id=name,
        revision=revisions.get(name),
        relation=relation,
        cosine=cosine,
        aligned=aligned,
        declared=name in declared,
    )


_NON_IDENTIFIABLE = ("v_proj", "o_proj")


def _identifiable_keys(stack: GramStack) -> np.ndarray:
    """Tensors an alignment reproduces exactly. A per-head invertible V/O mixing (a
    protected copy) leaves only the products O_h V_h fixed, so how a fine-tune's change
    splits between V and O cannot be recovered; clones are judged without V and O too."""
    return np.array([not any(p in k for p in _NON_IDENTIFIABLE) for k in stack.keys])


def _is_clone(
    stack: GramStack, i: int, j: int, ident: np.ndarray, min_cos: float, tol: float
) -> bool:
    gi, gj = float(stack.total[i, i]), float(stack.total[j, j])
    if gi <= 0 or gj <= 0 or abs(math.sqrt(gj / gi) - 1.0) >= tol:
        return False
    c = stack.cosine(i, j)
    if c > min_cos:
        return True
    if not ident.any() or ident.all() or c < 0.95:
        return False
    g = stack.tensor_gram[ident].sum(axis=0)
    den = math.sqrt(max(g[i, i], 0.0) * max(g[j, j], 0.0))
    return den > 0 and g[i, j] / den > min_cos


def _created(name: str, fp: Fingerprint, created_at: Mapping[str, datetime] | None) -> float:
    when = (created_at or {}).get(name)
    if when is None and fp.meta.get("created_at"):
        try:
            when = datetime.fromisoformat(str(fp.meta["created_at"]).replace("Z", "+00:00"))
        except ValueError:
            when = None
    return when.timestamp() if when is not None else math.inf


def _clone_groups(
    stack: GramStack,
    names: Sequence[str],
    cidx: Mapping[str, int],
    ident: np.ndarray,
    min_cos: float,
    tol: float,
    prints: Mapping[str, Fingerprint],
    created_at: Mapping[str, datetime] | None,
) -> dict[str, list[str]]:
    """Representative -> its other copies, for groups of mutual clones among candidates.
    The oldest is the representative (a copy cannot predate its original); without dates
    the first in the caller's order."""
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b in combinations(names, 2):
        if _is_clone(stack, cidx[a], cidx[b], ident, min_cos, tol):
            parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(find(n), []).append(n)
    order = {n: i for i, n in enumerate(names)}
    out: dict[str, list[str]] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda n: (_created(n, prints[n], created_at), order[n]))
        out[members[0]] = members[1:]
    return out


def _drop_siblings(
    subject: Fingerprint,
    prints: Mapping[str, Fingerprint],
    stack: GramStack,
    fit: Fit,
    base: int | None,
    base_fp: Fingerprint | None,
    keys: Sequence[str],
    max_row_z2: float,
) -> tuple[Fit, dict[str, float]]:
    """Remove members whose per-row coefficients scatter (correlated siblings), worst
    first, refitting the rest; returns the fit and every member's statistic.

    A true parent is copied in whole: one coefficient for every row of a tensor, and the
    rest of the subject independent of it. A same-task sibling shares part of its update in
    proportions that differ from neuron to neuron (its global fit can look just like a
    merge with an unknown co-parent: coefficient 0.8, 65% explained)."""
    seen: dict[str, float] = {}
    while fit.members:
        names = [stack.names[j] for j in fit.members]
        stat = row_uniformity(
            subject,
            {n: prints[n] for n in names},
            {n: c for n, c in zip(names, fit.coefficients, strict=True)},
            base_weights=base_fp,
            base_coefficient=fit.base_coefficient,
            keys=keys,
        )
        seen.update(stat)
        if not stat:
            break
        worst = max(stat, key=lambda n: stat[n])
        if stat[worst] <= max_row_z2:
            break
        fit = solve(stack.total, [m for m in fit.members if stack.names[m] != worst], base=base)
    return fit, seen


def _sparse_refit(
    subject: Fingerprint,
    parents: Mapping[str, Fingerprint],
    attribution: Attribution,
    keys: Sequence[str],
    method: str,
) -> Attribution:
    """Coordinate-wise subset refit of a TIES / DARE merge (``attribution.subset_refit``).

    TIES keeps a parent's coordinate unscaled, so the fitted coefficient is the recipe's
    weight x lambda. DARE rescales survivors by 1/(1-p): the fit returns weight/(1-p) and is
    scaled back by (1-p), p from the subject's zeros where every parent moved (such a
    coordinate is 0 only when all k parents' entries were dropped: P = p^k)."""
    names = list(parents)
    fit = attribution.fit
    ys, xs = [], []
    for k in keys:
        w = math.sqrt(subject.tensors[k].weight)
        ys.append(subject.tensors[k].sample.astype(np.float64) * w)
        xs.append(np.stack([parents[n].tensors[k].sample.astype(np.float64) * w
                            for n in names], axis=1))
    y, x = np.concatenate(ys), np.concatenate(xs)
    init = [max(c, 1e-3) for c in fit.coefficients]
    coef = subset_refit(y, x, init)
    if method.startswith("dare"):
        # judged only where every parent moved: elsewhere a parent's own zeros (untouched
        # embedding rows) would pass for drops
        every = (x != 0).all(axis=1)
        if every.any():
            zf = float(np.mean(y[every] == 0))
            coef = coef * (1.0 - zf ** (1.0 / max(1, len(names))))
    return replace(attribution, fit=replace(fit, coefficients=tuple(float(c) for c in coef)))
