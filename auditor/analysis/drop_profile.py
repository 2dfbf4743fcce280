"""How a sparse merge kept each parent's entries, against their magnitude rank.

A magnitude cut (TIES trims the small entries, Breadcrumbs also the top outliers) keeps by
rank, deterministically, and rescales nothing; a random drop keeps a share at every rank
and rescales the survivors by 1/p: flat in rank for DARE, rising with rank for DELLA
(MAGPRUNE: keep probability linear in the entry's rank within its row). The profile is
read off a sparse fit's coordinate assignment (``sparse_fit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from auditor.analysis.fingerprint import Fingerprint, sample_indices

# Keep-by-rank profiles: rank explains at least this share of the keep/drop variance
# (eta^2) for a magnitude cut; a random drop leaves ~0
DETERMINISTIC = 0.5
# DELLA: keep rate rising by at least this much from a row's smallest entry to its
# largest, and by MIN_SLOPE_Z standard errors (DARE: flat)
MIN_SLOPE = 0.03
MIN_SLOPE_Z = 4.0
MIN_ROW = 16  # sampled entries a row needs for a within-row rank
PROFILE_BINS = 50
MIN_PROFILE = 200


@dataclass(frozen=True)
class DropProfile:
    """How one parent's entries were kept, against their magnitude rank (where all parents
    move the same way, so no sign election removed anything)."""

    keep_rate: float
    determinism: float  # eta^2 of kept on the rank: ~1 magnitude cut, ~0 random drop
    slope: float  # keep rate from a row's smallest entry to its largest (DELLA: 2 epsilon)
    slope_se: float
    intercept: float
    top_kept: float  # keep rate of the top 0.5% by magnitude (Breadcrumbs: outliers gone)
    mid_kept: float  # between the median and the 90th percentile


@dataclass(frozen=True)
class Layout:
    """Where each sampled coordinate sits: its tensor and its row (for within-row ranks)."""

    segments: tuple[slice, ...]
    tensor_id: np.ndarray
    rank_group: np.ndarray  # row where the row holds MIN_ROW samples, else the tensor


def layout(subject: Fingerprint, keys: Sequence[str]) -> Layout:
    segments: list[slice] = []
    tid: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    start = 0
    next_group = 0
    for t, k in enumerate(keys):
        tp = subject.tensors[k]
        n = tp.sample.shape[0]
        segments.append(slice(start, start + n))
        tid.append(np.full(n, t, dtype=np.int64))
        if len(tp.shape) >= 2:
            width = int(np.prod(tp.shape[1:]))
            rows = sample_indices(k, tp.shape, subject.sample_size)[:n] // width
        else:
            rows = np.zeros(n, dtype=np.int64)
        _, inv, cnt = np.unique(rows, return_inverse=True, return_counts=True)
        # rows too thinly sampled for a rank fall back to the whole tensor (one group)
        g = np.where(cnt[inv] >= MIN_ROW, inv + 1, 0) + next_group
        next_group += int(inv.max(initial=0)) + 2
        groups.append(g)
        start += n
    return Layout(tuple(segments), np.concatenate(tid), np.concatenate(groups))


def group_quantile(v: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Rank of each value within its group, as a share in [0, 1]."""
    order = np.lexsort((v, group))
    g = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    counts = np.diff(np.r_[starts, g.size])
    pos = np.arange(g.size) - np.repeat(starts, counts)
    q = np.empty(v.size)
    q[order] = pos / np.maximum(np.repeat(counts, counts) - 1, 1)
    return q


def profiles(y: np.ndarray, x: np.ndarray, mask_nz: np.ndarray,
              layout: Layout) -> tuple[DropProfile, ...]:
    """Each parent's keep-by-rank profile (see ``DropProfile``). Judged where every parent
    moves the same way (no sign election there), so only the trim or drop removes."""
    nz = y != 0
    full = np.zeros(x.shape, dtype=bool)
    full[nz] = mask_nz
    s = np.sign(x)
    same = (np.abs(s.sum(axis=1)) == x.shape[1]) & (x != 0).all(axis=1)
    out = []
    for i in range(x.shape[1]):
        sel = same & (x[:, i] != 0)
        if sel.sum() < MIN_PROFILE:
            # too little to tell: read as a cut (no rescaling, the coefficient as fitted)
            out.append(DropProfile(1.0, 1.0, 0.0, float("inf"), 1.0, 1.0, 1.0))
            continue
        mag = np.abs(x[:, i])
        # TIES and Breadcrumbs rank within the tensor, DELLA within the row
        tq = group_quantile(mag, layout.tensor_id)[sel]
        rq = group_quantile(mag, layout.rank_group)[sel]
        kept = full[sel, i].astype(np.float64)
        det = max(_eta2(kept, tq), _eta2(kept, rq))
        slope, se, icpt = _line(rq, kept)
        top = kept[tq >= 0.995]
        mid = kept[(tq >= 0.5) & (tq < 0.9)]
        out.append(DropProfile(
            keep_rate=float(kept.mean()), determinism=det, slope=slope, slope_se=se,
            intercept=icpt, top_kept=float(top.mean()) if top.size else 1.0,
            mid_kept=float(mid.mean()) if mid.size else 1.0))
    return tuple(out)


def _eta2(kept: np.ndarray, q: np.ndarray) -> float:
    """Share of the keep/drop variance explained by the rank (binned)."""
    var = float(kept.var())
    if var <= 0:
        return 1.0
    b = np.minimum((q * PROFILE_BINS).astype(np.int64), PROFILE_BINS - 1)
    cnt = np.bincount(b, minlength=PROFILE_BINS)
    mean = np.bincount(b, weights=kept, minlength=PROFILE_BINS) / np.maximum(cnt, 1)
    within = float(np.sum((kept - mean[b]) ** 2)) / kept.size
    return 1.0 - within / var


def _line(q: np.ndarray, kept: np.ndarray) -> tuple[float, float, float]:
    """Least-squares slope, its standard error, and intercept of kept on rank."""
    qc = q - q.mean()
    sxx = float(qc @ qc)
    if sxx <= 0 or q.size < 3:
        return 0.0, float("inf"), float(kept.mean())
    slope = float(qc @ (kept - kept.mean())) / sxx
    icpt = float(kept.mean() - slope * q.mean())
    resid = kept - icpt - slope * q
    se = float(np.sqrt(float(resid @ resid) / (q.size - 2) / sxx))
    return slope, se, icpt


def rescale_kind(profiles: Sequence[DropProfile]) -> str:
    """``none`` for a magnitude cut (TIES, Breadcrumbs), ``dare`` for a flat random drop,
    ``della`` for a random drop that keeps the larger entries more often."""
    if not profiles or float(np.mean([p.determinism for p in profiles])) >= DETERMINISTIC:
        return "none"
    slope = float(np.mean([p.slope for p in profiles]))
    se = float(np.sqrt(np.mean([p.slope_se ** 2 for p in profiles]) / len(profiles)))
    return "della" if slope >= MIN_SLOPE and slope >= MIN_SLOPE_Z * se else "dare"


def keep_probability(
    x: np.ndarray, profiles: Sequence[DropProfile], kind: str, layout: Layout
) -> np.ndarray:
    """Per coordinate and parent, the probability its entry was kept (1 for a cut)."""
    p = np.ones(x.shape)
    if kind == "none":
        return p
    for i, prof in enumerate(profiles):
        if kind == "dare":
            p[:, i] = prof.keep_rate
        else:
            rq = group_quantile(np.abs(x[:, i]), layout.rank_group)
            p[:, i] = prof.intercept + prof.slope * rq
    return np.clip(p, 0.02, 1.0)


__all__ = ["DropProfile", "Layout", "group_quantile", "keep_probability", "layout", "profiles",
           "rescale_kind"]
