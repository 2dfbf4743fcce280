"""Parents and coefficients of a sparse merge (TIES, DARE, Breadcrumbs, DELLA).

Every coordinate the merge kept is ``sum_{i in S} c_i x_i`` over the subset S of parents
that survived trimming / dropping and the sign election (``attribution.subset_refit``);
with the true parents that holds *exactly* on nearly every kept coordinate (DELLA: up to
its per-entry 1/p rescaling). A sibling of a parent never reproduces coordinates exactly,
so the parents are chosen by how much of the subject's kept coordinates they reproduce,
not by how correlated they are: siblings share a data direction, not the merge's values.

Densities may differ from parent to parent: a parent pruned to 30% still reproduces its
own 30% exactly, so every parent is kept with its own coefficient. DARE and DELLA rescale
survivors by 1/p; the effective coefficient is scaled back by each parent's own keep rate,
measured as the share of its moved coordinates it still holds in the subject.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from auditor.analysis.attribution import subset_refit
from auditor.analysis.fingerprint import Fingerprint

# |y - fit| below this share of |y| (plus a rounding floor): the coordinate is reproduced
EXACT_RTOL = 1e-3
MAX_PARENTS = 4
PRESELECT = 12
MIN_COEFFICIENT = 0.08


@dataclass(frozen=True)
class SparseFit:
    """Sparse parents (names), effective coefficients, and the evidence behind them."""

    parents: tuple[str, ...]
    coefficients: tuple[float, ...]  # effective: as the kept coordinates carry them
    explained: float  # R^2 on the subject's nonzero coordinates
    exact_fraction: float  # nonzero coordinates reproduced within EXACT_RTOL
    keep_rates: tuple[float, ...]  # per parent: share of its moved coordinates kept
    # where two parents pull opposite ways and the subject moved: the share that kept
    # both (a weighted sum); 0 under TIES sign election, which keeps one side only
    conflict_both: float | None = None


def _arrays(
    subject: Fingerprint, prints: Mapping[str, Fingerprint], keys: Sequence[str],
    base: Fingerprint | None,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    y = np.concatenate([subject.tensors[k].sample.astype(np.float64) for k in keys])
    xs = {n: np.concatenate([fp.tensors[k].sample.astype(np.float64) for k in keys])
          for n, fp in prints.items()}
    if base is not None and all(k in base.tensors for k in keys):
        scale = np.concatenate([np.abs(base.tensors[k].sample.astype(np.float64))
                                for k in keys])
    else:
        scale = np.zeros_like(y)
    # float32 weights minus float32 base: rounding at ~1e-6 of the weight's magnitude
    return y, xs, 1e-6 * scale + 1e-12


def _assign(y: np.ndarray, x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Per coordinate, the subset of nonzero parents that best reproduces y: (n, p) mask."""
    p = x.shape[1]
    subsets = np.array([[(s >> i) & 1 for i in range(p)] for s in range(1, 2**p)], dtype=bool)
    pred = (x * c[None, :]) @ subsets.T.astype(float)
    allowed = ~((x[:, None, :] == 0) & subsets[None, :, :]).any(axis=2)
    err = np.where(allowed, np.abs(pred - y[:, None]), np.inf)
    return subsets[np.argmin(err, axis=1)]


def _evaluate(
    y: np.ndarray, x: np.ndarray, floor: np.ndarray, inits: Sequence[float] = (1.0,)
) -> tuple[np.ndarray, float, float, np.ndarray]:
    nz = y != 0
    yn, xn, fl = y[nz], x[nz], floor[nz]
    ls, *_ = np.linalg.lstsq(xn, yn, rcond=None)
    ls = np.clip(ls, 1e-3, None)
    modes = _ratio_modes(yn, xn, ls)
    best: tuple[np.ndarray, float, float, np.ndarray] | None = None
    # the alternation has local optima: start from the exact ratios where they show,
    # then from the least-squares mix and from it scaled up (rescaled survivors carry
    # 1/(1-p) times the recipe's weight)
    for start in (modes, *(ls * scale for scale in inits)):
        c = subset_refit(yn, xn, start, iterations=30)
        mask = _assign(yn, xn, c)
        pred = (xn * mask * c[None, :]).sum(axis=1)
        resid = yn - pred
        explained = 1.0 - float(resid @ resid) / max(float(yn @ yn), 1e-300)
        exact = float(np.mean(np.abs(resid) <= EXACT_RTOL * np.abs(yn) + fl)) if yn.size else 0.0
        if best is None or explained + exact > best[1] + best[2]:
            best = (c, explained, exact, mask)
        if exact > 0.9:
            break
    assert best is not None
    return best


def _ratio_modes(y: np.ndarray, x: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Per parent, the value y / x_i takes most often: where parent i alone survived, the
    ratio is its effective coefficient exactly, again and again (a sibling's ratios
    scatter). Falls back to ``fallback`` when no value repeats."""
    out = np.array(fallback, dtype=float)
    for i in range(x.shape[1]):
        ok = (x[:, i] != 0) & (y != 0)
        r = y[ok] / x[ok, i]
        r = r[(r > 1e-2) & (r < 1e2)]
        if r.size < 50:
            continue
        bins = np.round(np.log(r) / 2e-4).astype(np.int64)
        vals, counts = np.unique(bins, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] >= max(20, 0.02 * r.size):
            out[i] = float(np.median(r[bins == vals[top]]))
    return out


def _keep_rates(y: np.ndarray, x: np.ndarray, mask_nz: np.ndarray) -> np.ndarray:
    """Share of each parent's moved coordinates that survive in the subject. Judged where
    every parent moves the same way (no sign election there), so only the drop removes."""
    nz = y != 0
    full = np.zeros(x.shape, dtype=bool)
    full[nz] = mask_nz
    s = np.sign(x)
    same = (np.abs(s.sum(axis=1)) == x.shape[1]) & (x != 0).all(axis=1)
    rates = []
    for i in range(x.shape[1]):
        sel = same & (x[:, i] != 0)
        rates.append(float(full[sel, i].mean()) if sel.any() else 1.0)
    return np.asarray(rates)


def fit_sparse(
    subject: Fingerprint,
    candidates: Mapping[str, Fingerprint],
    *,
    keys: Sequence[str],
    order: Sequence[str],
    base: Fingerprint | None = None,
    min_gain: float = 0.02,
) -> SparseFit:
    """Forward selection of sparse parents among ``order`` (candidates, most related
    first; the first ``PRESELECT`` are tried) by the share of the subject's kept
    coordinates they reproduce."""
    pool = [n for n in order if n in candidates][:PRESELECT]
    y, xs, floor = _arrays(subject, {n: candidates[n] for n in pool}, keys, base)
    chosen: list[str] = []
    best = (np.zeros(0), 0.0, 0.0, np.zeros((0, 0), dtype=bool))
    while len(chosen) < MAX_PARENTS:
        trial_best: tuple[float, str, tuple] | None = None
        for n in pool:
            if n in chosen:
                continue
            cols = [*chosen, n]
            res = _evaluate(y, np.stack([xs[c] for c in cols], axis=1), floor)
            # R^2 and exactness both count: a last small parent adds little R^2 but
            # turns most of its coordinates exact
            score = res[1] + res[2]
            if score - best[1] - best[2] >= min_gain and res[0][-1] >= MIN_COEFFICIENT and (
                    trial_best is None or score > trial_best[0]):
                trial_best = (score, n, res)
        if trial_best is None:
            break
        chosen.append(trial_best[1])
        best = trial_best[2]
        # a parent whose coefficient collapsed was a stand-in for the others
        keep = [i for i, c in enumerate(best[0]) if c >= MIN_COEFFICIENT]
        if len(keep) < len(chosen):
            chosen = [chosen[i] for i in keep]
            best = _evaluate(y, np.stack([xs[c] for c in chosen], axis=1), floor)
    if not chosen:
        return SparseFit((), (), 0.0, 0.0, ())
    # backward elimination: a parent the others make redundant (a merge of the parents
    # picked first, say) is dropped
    for n in list(chosen):
        if len(chosen) < 2:
            break
        rest = [c for c in chosen if c != n]
        res = _evaluate(y, np.stack([xs[c] for c in rest], axis=1), floor)
        if res[1] + res[2] >= best[1] + best[2] - 0.005:
            chosen, best = rest, res
    x = np.stack([xs[c] for c in chosen], axis=1)
    best = _evaluate(y, x, floor, inits=(1.0, 1.5, 2.0, 3.0))
    keep = [i for i, c in enumerate(best[0]) if c >= MIN_COEFFICIENT]
    if 0 < len(keep) < len(chosen):
        chosen = [chosen[i] for i in keep]
        x = np.stack([xs[c] for c in chosen], axis=1)
        best = _evaluate(y, x, floor, inits=(1.0, 1.5, 2.0, 3.0))
    rates = _keep_rates(y, x, best[3])
    return SparseFit(tuple(chosen), tuple(float(c) for c in best[0]), best[1], best[2],
                     tuple(float(r) for r in rates), _conflict_both(y, x, best[3]))


def _conflict_both(y: np.ndarray, x: np.ndarray, mask_nz: np.ndarray) -> float | None:
    if x.shape[1] < 2:
        return None
    xn = x[y != 0]
    pos = ((xn > 0) & mask_nz).any(axis=1)
    neg = ((xn < 0) & mask_nz).any(axis=1)
    conflict = (xn > 0).any(axis=1) & (xn < 0).any(axis=1)
    if conflict.sum() < 20:
        return None
    return float((pos & neg)[conflict].mean())


def recipe_coefficients(fit: SparseFit, *, rescale: str) -> tuple[float, ...]:
    """The recipe's weight x lambda per parent: the effective coefficient, scaled back by
    the keep rate where the method rescaled survivors (DARE: 1/(1-p); DELLA: 1/p)."""
    if rescale == "none":
        return fit.coefficients
    return tuple(c * r for c, r in zip(fit.coefficients, fit.keep_rates, strict=True))


__all__ = ["SparseFit", "fit_sparse", "recipe_coefficients"]
