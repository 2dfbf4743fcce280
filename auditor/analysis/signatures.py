"""Cheap merge-method signatures, read off the subject's fingerprint and a parent fit.

* ``zero_fraction``: TIES and DARE leave many task-vector coordinates exactly 0 (trimmed or
  dropped), far more than any fine-tune (compare ``parent_zero_fraction``).
* ``zero_magnitude_ratio``: RMS of the fitted mix where the subject is 0 over where it is
  not. DARE drops at random (ratio ~1); TIES trims the *small* magnitudes (ratio << 1).
* ``nonzero_inflation``: least-squares scale of the subject on the fitted mix over its
  nonzero coordinates: DARE rescales survivors by 1/(1-p) (> 1), others stay ~1.
* ``conflict_ratio``: on coordinates where two parents pull in opposite directions, the
  subject's magnitude over the mix's. A weighted sum cancels there (ratio ~ inflation);
  sign election keeps only the winning side (ratio clearly larger): TIES / DARE-TIES.
* ``base_gain`` / ``base_coefficient``: how much a base term improves the fit, and its
  coefficient: SLERP leaves (a + b - 1) theta_B, a fit with no base term misses it.
* ``top_zero_fraction`` / ``low_zero_fraction`` / ``mid_zero_fraction``: how often the
  subject is 0 where the fitted mix is in its top 2% of magnitudes, its bottom quarter, and
  between the median and the 90th percentile. TIES trims the small ones only (low >> mid,
  top ~0); Breadcrumbs also drops the top outliers (top >> mid); DARE drops at random (all
  three alike); DELLA drops less the larger an entry (low > mid > top, gently).
* ``drop_*`` / ``outlier_keep`` (sparse fits, from ``sparse_fit.profile_signatures``): each
  parent's own keep-by-rank profile, read off the coordinate assignment. Where present they
  decide: a magnitude cut (``drop_random`` 0: TIES; with ``outlier_keep`` ~0: Breadcrumbs),
  a flat random drop (DARE) or one graded by rank (``drop_graded`` 1: DELLA).

Which method a set of signatures means is decided by the method registry
(``METHOD_REGISTRY``), one entry per merge method as in mergekit's method registry: each
entry says what the method leaves in the weights (sparse or dense, a base term, a
rescaling, a sign election) and how to recognise it; ``guess_method`` asks them in order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from auditor.analysis.fingerprint import Fingerprint


def merge_signatures(
    subject: Fingerprint,
    parents: Mapping[str, Fingerprint],
    coefficients: Mapping[str, float],
    *,
    base_weights: Fingerprint | None = None,
    base_coefficient: float | None = None,
    keys: Sequence[str] | None = None,
) -> dict[str, float]:
    """Signatures of how ``subject`` was made from ``parents`` (see the module docstring)."""
    parent_zero = max((fp.zero_fraction for fp in parents.values()), default=0.0)
    sig: dict[str, float] = {
        "zero_fraction": subject.zero_fraction,
        "parent_zero_fraction": parent_zero,
    }
    if not parents:
        return sig
    use = list(keys) if keys is not None else subject.keys()
    use = [k for k in use if all(k in fp.tensors for fp in parents.values())]
    zero_f2 = nz_f2 = 0.0
    n_zero = n_nz = 0
    yf = ff = 0.0
    conf_y = conf_f = 0.0
    # expected sum |y| on conflict coordinates under DARE (drop p, rescale) without and with
    # sign election, for two-parent conflicts; p from the subject's zero fraction
    n_par = max(1, len(parents))
    p_drop = min(0.95, max(0.0, subject.zero_fraction - parent_zero)) ** (1.0 / n_par)
    exp_lin = exp_elect = 0.0
    bands = np.zeros((3, 2))  # (top 2%, bottom quarter, median..90th) x (zeros, count)
    for k in use:
        y = subject.tensors[k].sample.astype(np.float64)
        parts = [
            coefficients.get(n, 0.0) * fp.tensors[k].sample.astype(np.float64)
            for n, fp in parents.items()
        ]
        f = np.sum(parts, axis=0)
        if base_weights is not None and base_coefficient and k in base_weights.tensors:
            f = f + base_coefficient * base_weights.tensors[k].sample.astype(np.float64)
        zero = y == 0
        _band_zeros(bands, np.abs(f), zero)
        zero_f2 += float(np.sum(f[zero] ** 2))
        n_zero += int(zero.sum())
        nz = ~zero
        nz_f2 += float(np.sum(f[nz] ** 2))
        n_nz += int(nz.sum())
        yf += float(y[nz] @ f[nz])
        ff += float(f[nz] @ f[nz])
        if len(parts) >= 2:
            p = np.stack(parts)
            conflict = nz & (p.max(axis=0) > 0) & (p.min(axis=0) < 0)
            conf_y += float(np.abs(y[conflict]).sum())
            conf_f += float(np.abs(f[conflict]).sum())
            if len(parts) == 2:
                a, b = p[0][conflict], p[1][conflict]
                both = np.abs(a + b)
                one = np.abs(a) + np.abs(b)
                # both survive w.p. (1-p)^2, one alone w.p. p(1-p); rescaled by 1/(1-p);
                # renormalised to "at least one survives" (the subject is nonzero here)
                keep = 1.0 - p_drop * p_drop
                exp_lin += float(((1 - p_drop) * both + p_drop * one).sum()) / keep
                exp_elect += (
                    float(((1 - p_drop) * np.maximum(np.abs(a), np.abs(b)) + p_drop * one).sum())
                    / keep
                )
    for name, (zeros, count) in zip(("top", "low", "mid"), bands, strict=True):
        if count:
            sig[f"{name}_zero_fraction"] = float(zeros / count)
    if n_zero and n_nz and nz_f2 > 0:
        sig["zero_magnitude_ratio"] = math.sqrt((zero_f2 / n_zero) / (nz_f2 / n_nz))
    if ff > 0:
        sig["nonzero_inflation"] = yf / ff
    if conf_f > 0:
        sig["conflict_ratio"] = conf_y / conf_f
    if exp_lin > 0 and exp_elect > exp_lin:
        # 0 when the conflicts look like a plain DARE sum, 1 when like sign election
        sig["sign_election"] = float(np.clip((conf_y - exp_lin) / (exp_elect - exp_lin), -1.0, 2.0))
    return sig


def _band_zeros(bands: np.ndarray, mag: np.ndarray, zero: np.ndarray) -> None:
    """Add one tensor's zero counts per magnitude band of the fitted mix (see above)."""
    moving = mag > 0
    if moving.sum() < 50:
        return
    m = mag[moving]
    z = zero[moving]
    q25, q50, q90, q98 = np.quantile(m, [0.25, 0.5, 0.9, 0.98])
    for row, sel in enumerate((m >= q98, m <= q25, (m >= q50) & (m <= q90))):
        bands[row, 0] += float(z[sel].sum())
        bands[row, 1] += float(sel.sum())


# --- the method registry ------------------------------------------------------------
Rescale = Literal["none", "dare", "della"]


@dataclass(frozen=True)
class MethodContext:
    """What a recogniser may read besides the signatures."""

    coefficients: tuple[float, ...]
    base_coefficient: float | None
    base_gain: float
    layerwise: bool


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: what it leaves in the weights and how to recognise it.

    ``sparse``: it leaves task-vector coordinates exactly 0 (trims or drops).
    ``election``: TIES sign election (only the winning sign's entries are summed).
    ``rescale``: survivors rescaled by 1/(1-p) (DARE) or 1/p(rank) (DELLA): the fitted
    coefficient is scaled back by the keep probability.
    ``base_term``: the task vector keeps a multiple of the base weights (SLERP).
    """

    name: str
    sparse: bool
    recognise: Callable[[Mapping[str, float], MethodContext], bool]
    election: bool = False
    rescale: Rescale = "none"
    base_term: bool = False
    layerwise: bool = False
    description: str = ""


METHOD_REGISTRY: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry; recognisers are asked in registration order."""
    if method.name in METHOD_REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    METHOD_REGISTRY[method.name] = method
    return method


def _z(sig: Mapping[str, float], name: str, default: float = 0.0) -> float:
    return float(sig.get(name, default))


def _election(sig: Mapping[str, float]) -> bool:
    election = sig.get("sign_election")
    if election is not None:
        return election > 0.5
    conflict = sig.get("conflict_ratio")
    return conflict is not None and conflict > 1.15 * _z(sig, "nonzero_inflation", 1.0)


def _outliers_dropped(sig: Mapping[str, float]) -> bool:
    # Breadcrumbs: the largest entries are cut, deterministically
    if "outlier_keep" in sig:
        return _z(sig, "drop_random") < 0.5 and _z(sig, "outlier_keep") < 0.5
    return _z(sig, "top_zero_fraction") > max(0.3, 2.0 * _z(sig, "mid_zero_fraction"))


def _trimmed(sig: Mapping[str, float]) -> bool:
    # TIES: small magnitudes trimmed, large kept
    if "drop_random" in sig:
        return _z(sig, "drop_random") < 0.5 and not _outliers_dropped(sig)
    return _z(sig, "zero_magnitude_ratio", 1.0) < 0.6 and not _outliers_dropped(sig)


def _magnitude_graded(sig: Mapping[str, float]) -> bool:
    # DELLA: drop rate falls with magnitude, gently (DARE: flat; TIES: a step)
    if "drop_graded" in sig:
        return _z(sig, "drop_graded") >= 0.5
    low, mid = _z(sig, "low_zero_fraction"), _z(sig, "mid_zero_fraction")
    return low > mid + 0.05 and not _trimmed(sig) and not _outliers_dropped(sig)


for _m in (
    MergeMethod("breadcrumbs_ties", True, lambda s, c: _outliers_dropped(s) and _election(s),
                election=True, description="Breadcrumbs with sign election"),
    MergeMethod("breadcrumbs", True, lambda s, c: _outliers_dropped(s),
                description="top outliers and small entries dropped, weighted sum"),
    MergeMethod("ties", True, lambda s, c: _trimmed(s), election=True,
                description="small entries trimmed, sign election, disjoint sum"),
    MergeMethod("della", True, lambda s, c: _magnitude_graded(s) and _election(s),
                election=True, rescale="della",
                description="magnitude-graded random drop, 1/p rescale, sign election"),
    MergeMethod("della_linear", True, lambda s, c: _magnitude_graded(s), rescale="della",
                description="magnitude-graded random drop, 1/p rescale, weighted sum"),
    MergeMethod("dare_ties", True, lambda s, c: _election(s), election=True, rescale="dare",
                description="uniform random drop, 1/(1-p) rescale, sign election"),
    MergeMethod("dare_linear", True, lambda s, c: True, rescale="dare",
                description="uniform random drop, 1/(1-p) rescale, weighted sum"),
    MergeMethod("slerp", False,
                lambda s, c: len(c.coefficients) == 2 and c.base_coefficient is not None
                and c.base_coefficient > 0 and c.base_gain > 2e-4,
                base_term=True, description="per-tensor spherical interpolation of two"),
    MergeMethod("layerwise", False, lambda s, c: c.layerwise, layerwise=True,
                description="task arithmetic with a coefficient per layer (gradients)"),
    MergeMethod("linear", False,
                lambda s, c: len(c.coefficients) >= 2 and abs(sum(c.coefficients) - 1) < 0.05,
                description="weighted average, weights summing to one"),
    MergeMethod("task_arithmetic", False, lambda s, c: True,
                description="base plus a weighted sum of task vectors"),
):
    register_method(_m)


def is_sparse(signatures: Mapping[str, float], *, margin: float = 0.05) -> bool:
    """Far more exact zeros than the parents: trimmed or dropped (TIES, DARE, ...)."""
    return _z(signatures, "zero_fraction") > _z(signatures, "parent_zero_fraction") + margin


def guess_method(
    signatures: Mapping[str, float],
    *,
    coefficients: Sequence[float],
    base_coefficient: float | None = None,
    base_gain: float = 0.0,
    layerwise: bool = False,
    sparse_margin: float = 0.05,
) -> str | None:
    """The likeliest merge method (the first registry entry whose sparsity matches and
    whose recogniser accepts), or None without a parent."""
    if not coefficients:
        return None
    sparse = is_sparse(signatures, margin=sparse_margin)
    ctx = MethodContext(tuple(float(c) for c in coefficients), base_coefficient, base_gain,
                        layerwise)
    for method in METHOD_REGISTRY.values():
        if method.sparse == sparse and method.recognise(signatures, ctx):
            return method.name
    return None


def row_uniformity(
    subject: Fingerprint,
    parents: Mapping[str, Fingerprint],
    coefficients: Mapping[str, float],
    *,
    base_weights: Fingerprint | None = None,
    base_coefficient: float | None = None,
    keys: Sequence[str] | None = None,
    min_row: int = 8,
) -> dict[str, float]:
    """Per parent, the mean squared z-score of its *per-row* coefficient around the
    tensor's: ~1 for a parent that was copied in whole and scaled (each output row carries
    the same coefficient, the rest of the subject is independent of it), >> 1 for a
    correlated sibling, whose shared part differs from neuron to neuron.

    Rows come from the fingerprint's sampled coordinates (the sample indices depend only
    on name and shape, so they are known); a row's coefficient is the least-squares share
    of that parent in the fit residual of the row, its standard error the row residual's
    spread over the parent's row norm."""
    from auditor.analysis.fingerprint import sample_indices

    use = list(keys) if keys is not None else subject.keys()
    names = list(parents)
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    for k in use:
        t = subject.tensors[k]
        if len(t.shape) != 2 or any(k not in fp.tensors for fp in parents.values()):
            continue
        y = t.sample.astype(np.float64)
        xs = {n: parents[n].tensors[k].sample.astype(np.float64) for n in names}
        fit = sum(coefficients.get(n, 0.0) * xs[n] for n in names)
        if base_weights is not None and base_coefficient and k in base_weights.tensors:
            fit = fit + base_coefficient * base_weights.tensors[k].sample.astype(np.float64)
        r = y - fit
        rows = sample_indices(k, t.shape, subject.sample_size)[: y.size] // t.shape[1]
        _, inv, cnt = np.unique(rows, return_inverse=True, return_counts=True)
        ok = cnt >= min_row
        if ok.sum() < 4:
            continue
        rr = np.bincount(inv, weights=r * r)
        for n in names:
            x = xs[n]
            xx = np.bincount(inv, weights=x * x)
            xr = np.bincount(inv, weights=x * r)
            good = ok & (xx > 0)
            if good.sum() < 4:
                continue
            delta = xr[good] / xx[good]
            var = np.maximum(rr[good] - xr[good] ** 2 / xx[good], 1e-300) / (
                (cnt[good] - 1) * xx[good]
            )
            w = 1.0 / var
            mean = float(np.sum(w * delta) / np.sum(w))
            sums[n] += float(np.sum((delta - mean) ** 2 * w))
            counts[n] += int(good.sum()) - 1
    return {n: sums[n] / counts[n] for n in names if counts[n] > 0}
