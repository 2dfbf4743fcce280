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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from auditor.analysis.fingerprint import Fingerprint

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp")


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


def guess_method(
    signatures: Mapping[str, float],
    *,
    coefficients: Sequence[float],
    base_coefficient: float | None = None,
    base_gain: float = 0.0,
    sparse_margin: float = 0.05,
) -> str | None:
    """The likeliest merge method, or None when the subject does not look like a merge of
    at least two parents (one parent scaled is reported as task arithmetic)."""
    if not coefficients:
        return None
    sparse = signatures.get("zero_fraction", 0.0) > (
        signatures.get("parent_zero_fraction", 0.0) + sparse_margin
    )
    if sparse:
        zmr = signatures.get("zero_magnitude_ratio", 1.0)
        if zmr < 0.6:
            return "ties"
        election = signatures.get("sign_election")
        if election is not None:
            return "dare_ties" if election > 0.5 else "dare_linear"
        inflation = signatures.get("nonzero_inflation", 1.0)
        conflict = signatures.get("conflict_ratio")
        if conflict is not None and conflict > 1.15 * inflation:
            return "dare_ties"
        return "dare_linear"
    total = float(sum(coefficients))
    if (
        len(coefficients) == 2
        and base_coefficient is not None
        and base_coefficient > 0
        and base_gain > 2e-4
    ):
        return "slerp"
    if len(coefficients) >= 2 and abs(total - 1.0) < 0.05:
        return "linear"
    return "task_arithmetic"


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
