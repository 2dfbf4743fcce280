"""Merge attribution: the subject's task vector as a non-negative mix of candidates'.

    tau_s ~ sum_i c_i tau_i + c_0 theta_B,   c_i >= 0, c_0 signed

fitted by NNLS on Gram matrices (see ``similarity.GramStack``), globally and per layer.
The base term lets SLERP (a + b > 1 leaves (a + b - 1) theta_B in the task vector) and
linear merges whose weights do not sum to one fit exactly; it is signed, so it is entered
as two non-negative columns (+theta_B, -theta_B).

Parents are chosen by forward selection (add the candidate that most reduces the residual
while its cosine with the current residual is significant against the null, refit NNLS,
drop candidates whose coefficient vanished): a candidate that is itself a mix of others
(a sibling merge) is then not preferred over the true, more parsimonious parents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import nnls

from auditor.analysis.calibration import NullModel
from auditor.analysis.similarity import GramStack

Variant = Literal["all", "nonzero", "agree"]


@dataclass(frozen=True)
class Fit:
    """One NNLS fit of the subject (index 0) on columns ``members`` (+ a base term)."""

    members: tuple[int, ...]
    coefficients: tuple[float, ...]
    base_coefficient: float | None
    explained_fraction: float
    residual_sq: float
    subject_sq: float

    @property
    def residual_fraction(self) -> float:
        return 1.0 - self.explained_fraction

    def coefficient_of(self, index: int) -> float:
        return self.coefficients[self.members.index(index)] if index in self.members else 0.0


@dataclass(frozen=True)
class Attribution:
    """Global fit on the selected parents plus the same fit per layer group."""

    fit: Fit
    per_group: dict[str, Fit] = field(default_factory=dict)
    variant: Variant = "all"
    layerwise: bool = False
    layerwise_score: float = 0.0


def _matrices(stack: GramStack, variant: Variant, group: int | None) -> np.ndarray:
    # by name: the masked Grams are made only when a fit asks for them
    src = getattr(stack, {"all": "gram", "nonzero": "gram_nz", "agree": "gram_agree"}[variant])
    return src.sum(axis=0) if group is None else src[group]


def solve(
    gram: np.ndarray,
    members: Sequence[int],
    *,
    base: int | None = None,
    subject: int = 0,
) -> Fit:
    """NNLS of ``subject`` on ``members`` (non-negative) and ``base`` (signed), using only
    inner products: min c^T G c - 2 c^T g is solved as NNLS on (L^T, L^-1 g), G = L L^T."""
    cols = list(members)
    signs = [1.0] * len(cols)
    if base is not None:
        cols += [base, base]
        signs += [1.0, -1.0]
    yy = float(gram[subject, subject])
    if not cols or yy <= 0:
        return Fit(tuple(members), tuple(0.0 for _ in members), None, 0.0, max(yy, 0.0), yy)
    s = np.asarray(signs)
    g_mat = gram[np.ix_(cols, cols)] * np.outer(s, s)
    g_vec = gram[cols, subject] * s
    # scale columns to unit norm: NNLS and the Cholesky factor behave far better, and the
    # base column (|theta_B| >> |tau|) would otherwise swamp the ridge
    d = np.sqrt(np.clip(np.diag(g_mat), 1e-300, None))
    gn = g_mat / np.outer(d, d)
    vn = g_vec / d
    ridge = 1e-10 * max(1.0, float(np.max(np.abs(np.diag(gn)))))
    try:
        chol = np.linalg.cholesky(gn + ridge * np.eye(len(cols)))
    except np.linalg.LinAlgError:
        chol = np.linalg.cholesky(gn + 1e-6 * np.eye(len(cols)))
    b = np.linalg.solve(chol, vn)
    x, _ = nnls(chol.T, b, maxiter=50 * len(cols))
    coef = x / d
    resid = yy - 2.0 * float(coef @ g_vec) + float(coef @ g_mat @ coef)
    resid = max(resid, 0.0)
    n = len(members)
    base_c = None
    if base is not None:
        base_c = float(coef[n] - coef[n + 1])
    return Fit(
        members=tuple(members),
        coefficients=tuple(float(c) for c in coef[:n]),
        base_coefficient=base_c,
        explained_fraction=1.0 - resid / yy,
        residual_sq=resid,
        subject_sq=yy,
    )


def residual_cosine(gram: np.ndarray, fit: Fit, j: int, base: int | None) -> float:
    """Cosine of the current residual with candidate j, from inner products only."""
    cols = list(fit.members)
    coef = list(fit.coefficients)
    if base is not None and fit.base_coefficient is not None:
        cols.append(base)
        coef.append(fit.base_coefficient)
    rj = float(gram[0, j] - sum(c * gram[k, j] for k, c in zip(cols, coef, strict=True)))
    den = math.sqrt(max(fit.residual_sq, 1e-300) * max(float(gram[j, j]), 1e-300))
    return rj / den


def select_parents(
    stack: GramStack,
    candidates: Sequence[int],
    *,
    null: NullModel | None = None,
    base: int | None = None,
    variant: Variant = "all",
    min_gain: float = 0.01,
    min_z: float = 5.0,
    min_coefficient: float = 0.02,
    max_parents: int = 8,
) -> Fit:
    """Forward selection of the parents of the subject (index 0) among ``candidates``."""
    gram = _matrices(stack, variant, None)
    selected: list[int] = []
    fit = solve(gram, selected, base=base)
    null_loc = float(np.average(null.location, weights=stack.numel)) if null else 0.0
    null_sd = float(math.sqrt(np.average(null.spread**2, weights=stack.numel))) if null else 0.0
    while len(selected) < max_parents:
        best: tuple[float, int, Fit] | None = None
        for j in candidates:
            if j in selected or gram[j, j] <= 0:
                continue
            rc = residual_cosine(gram, fit, j, base)
            # analytic null of this pair plus the homologues' spread; the location shift
            # of unrelated homologues is scaled by how much of the subject is left
            sd = math.sqrt(stack.null_variance(0, j) + null_sd**2)
            shift = null_loc * math.sqrt(max(fit.residual_fraction, 0.0))
            if (rc - shift) / max(sd, 1e-12) < min_z:
                continue
            trial = solve(gram, [*selected, j], base=base)
            gain = trial.explained_fraction - fit.explained_fraction
            if gain < min_gain or trial.coefficient_of(j) < min_coefficient:
                continue
            if best is None or gain > best[0]:
                best = (gain, j, trial)
        if best is None:
            break
        selected.append(best[1])
        fit = best[2]
        # drop members NNLS pushed to ~0 (a sibling merge displaced by the true parents)
        keep = [m for m in selected if fit.coefficient_of(m) >= min_coefficient]
        if len(keep) != len(selected):
            selected = keep
            fit = solve(gram, selected, base=base)
    return _refine_by_swaps(gram, fit, candidates, base=base, min_coefficient=min_coefficient)


def _refine_by_swaps(
    gram: np.ndarray,
    fit: Fit,
    candidates: Sequence[int],
    *,
    base: int | None,
    min_coefficient: float,
    passes: int = 2,
) -> Fit:
    """Swap single members for unselected candidates while the fit improves. Greedy
    selection can take a sibling merge (itself a mix of the true parents) or a lossy copy
    (an fp16 re-upload) first; the true parent then fits strictly better."""
    selected = list(fit.members)
    for _ in range(passes):
        improved = False
        for pos in range(len(selected)):
            for j in candidates:
                if j in selected or gram[j, j] <= 0:
                    continue
                trial_set = [*selected[:pos], j, *selected[pos + 1 :]]
                trial = solve(gram, trial_set, base=base)
                if (
                    trial.explained_fraction > fit.explained_fraction + 1e-6
                    and min(trial.coefficients) >= min_coefficient
                ):
                    selected, fit, improved = trial_set, trial, True
        if not improved:
            break
    return fit


def attribute(
    stack: GramStack,
    parents: Sequence[int],
    *,
    base: int | None = None,
    variant: Variant = "all",
    layerwise_min_range: float = 0.15,
) -> Attribution:
    """Fit the subject on ``parents`` globally and per group; flag a layer-wise merge when
    per-group coefficients vary across depth well beyond their standard errors."""
    gram = _matrices(stack, variant, None)
    fit = solve(gram, parents, base=base)
    per_group: dict[str, Fit] = {}
    layer_rows: list[tuple[np.ndarray, np.ndarray]] = []
    for gi, gname in enumerate(stack.groups):
        gg = _matrices(stack, variant, gi)
        if gg[0, 0] <= 0:
            continue
        f = solve(gg, parents, base=base)
        per_group[gname] = f
        if gname.startswith("layer.") and parents:
            coef = np.asarray(f.coefficients)
            # standard error of each coefficient: residual spread over the group's effective
            # dimension, through the inverse Gram of the parents
            d_eff = max(1.0, _effective_dim(stack, gi))
            sigma2 = f.residual_sq / d_eff
            sub = gg[np.ix_(list(parents), list(parents))]
            try:
                inv_diag = np.diag(np.linalg.pinv(sub))
            except np.linalg.LinAlgError:
                inv_diag = np.full(len(parents), np.inf)
            se = np.sqrt(np.clip(sigma2 * inv_diag, 0, None))
            layer_rows.append((coef, se))
    layerwise, score = _layerwise(layer_rows, min_range=layerwise_min_range)
    return Attribution(
        fit=fit, per_group=per_group, variant=variant, layerwise=layerwise, layerwise_score=score
    )


def _effective_dim(stack: GramStack, group: int) -> float:
    """Participation ratio of the subject in a group: (sum x^2)^2 / sum x^4 (~ how many
    independent coordinates a residual spreads over)."""
    q = float(stack.quart[group, 0, 0])
    g = float(stack.gram[group, 0, 0])
    if q <= 0:
        return float(stack.n_sampled[group])
    return float(g * g / q)


def _layerwise(
    rows: list[tuple[np.ndarray, np.ndarray]], *, min_range: float
) -> tuple[bool, float]:
    """Chi-square-like score of coefficient variation across layers; layer-wise when some
    parent's per-layer coefficients span more than ``min_range`` and the variation is
    many standard errors."""
    if len(rows) < 2:
        return False, 0.0
    coefs = np.stack([r[0] for r in rows])  # (layers, parents)
    ses = np.stack([r[1] for r in rows])
    spans = coefs.max(axis=0) - coefs.min(axis=0)
    mean = coefs.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        chi = np.nansum(((coefs - mean) / np.maximum(ses, 1e-6)) ** 2, axis=0)
    dof = max(1, coefs.shape[0] - 1)
    score = float(np.max(chi / dof)) if chi.size else 0.0
    return bool(np.any(spans > min_range) and score > 9.0), score


def merged_member_expansion(
    stack: GramStack,
    fit: Fit,
    candidates: Sequence[int],
    *,
    base: int | None = None,
    min_explained: float = 0.98,
    tolerance: float = 0.005,
    min_coefficient: float = 0.02,
) -> Fit:
    """Replace a selected member that is itself a merge of other candidates by those
    candidates. Greedy selection takes the merge first (it explains most at once), but
    its constituents span it, so they fit at least as well; the primitive explanation is
    kept unless the merged candidate explains clearly more (``tolerance``)."""
    gram = stack.total
    selected = list(fit.members)
    changed = True
    while changed:
        changed = False
        for m in list(selected):
            pool = [j for j in candidates if j != m and gram[j, j] > 0]
            sub = select_parents_on(gram, m, pool, base=base, min_coefficient=min_coefficient)
            if sub.explained_fraction < min_explained or len(sub.members) < 2:
                continue
            trial_set = sorted({*(j for j in selected if j != m), *sub.members})
            trial = solve(gram, trial_set, base=base)
            keep = [j for j in trial_set if trial.coefficient_of(j) >= min_coefficient]
            trial = solve(gram, keep, base=base)
            if trial.explained_fraction >= fit.explained_fraction - tolerance:
                selected, fit, changed = keep, trial, True
                break
    return fit


def select_parents_on(
    gram: np.ndarray,
    target: int,
    pool: Sequence[int],
    *,
    base: int | None,
    min_coefficient: float,
    min_gain: float = 0.01,
) -> Fit:
    """Plain forward selection of ``target`` on ``pool`` (no null test: used to ask whether
    a candidate is itself a mix of other candidates)."""
    selected: list[int] = []
    fit = solve(gram, selected, base=base, subject=target)
    while len(selected) < 8:
        best: tuple[float, int, Fit] | None = None
        for j in pool:
            if j in selected:
                continue
            trial = solve(gram, [*selected, j], base=base, subject=target)
            gain = trial.explained_fraction - fit.explained_fraction
            ok = gain >= min_gain and trial.coefficient_of(j) >= min_coefficient
            if ok and (best is None or gain > best[0]):
                best = (gain, j, trial)
        if best is None:
            break
        selected.append(best[1])
        fit = best[2]
    return fit


def subset_refit(
    y: np.ndarray, x: np.ndarray, init: Sequence[float], *, iterations: int = 12
) -> np.ndarray:
    """Coefficients of a sparse merge (TIES, DARE) fitted coordinate by coordinate.

    Each nonzero coordinate of the subject is ``sum_{i in S} c_i x_i`` for the subset S of
    parents that survived trimming / dropping and the sign election. Alternate: given c,
    give every coordinate the subset of its nonzero parents that best reproduces it; given
    the subsets, refit c by least squares on the masked columns. The true subsets leave
    zero residual, so the truth is a fixed point, and no coordinate's trimmed or dropped
    parent biases the fit (a Gram fit over the support counts them as present)."""
    p = x.shape[1]
    c = np.asarray(init, dtype=float).copy()
    keep = y != 0
    y, x = y[keep], x[keep]
    if y.size == 0 or p == 0:
        return c
    subsets = np.array(
        [[(s >> i) & 1 for i in range(p)] for s in range(1, 2**p)], dtype=bool
    )  # (S, p)
    sub_f = subsets.T.astype(float)
    # a parent that did not move a coordinate cannot have survived there (fixed per call)
    zero = x == 0
    blocked = (zero.astype(float) @ sub_f) > 0 if zero.any() else None
    last: np.ndarray | None = None
    for _ in range(iterations):
        # prediction of every subset at every coordinate: (n, S)
        err = np.abs((x * c[None, :]) @ sub_f - y[:, None])
        if blocked is not None:
            err[blocked] = np.inf
        pick = np.argmin(err, axis=1)
        if last is not None and np.array_equal(pick, last):
            break  # same subsets, same least-squares solution: a fixed point
        last = pick
        mask = subsets[pick]  # (n, p)
        a = x * mask
        new = _masked_lstsq(a, y)
        new = np.clip(new, 0.0, None)
        if np.allclose(new, c, atol=1e-7):
            c = new
            break
        c = new
    return c


def _masked_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares through the (p x p) normal equations: p is at most a handful and n
    tens of thousands, where an SVD of the (n x p) matrix is far slower; falls back to
    the SVD when the normal matrix is near singular."""
    ata = a.T @ a
    d = np.sqrt(np.clip(np.diag(ata), 1e-300, None))
    norm = ata / np.outer(d, d)
    if np.linalg.cond(norm) < 1e8:
        return np.linalg.solve(norm, (a.T @ y) / d) / d
    sol, *_ = np.linalg.lstsq(a, y, rcond=None)
    return sol
