"""Statistics on sampled weight chunks: is a candidate derived from the base, and from which
homologues, with confidence intervals from a bootstrap over the chunks.

The inputs are the chunks ``auditor.weights.sampling`` reads at fixed-seed positions: lists
of 1-D float32 tensors, aligned element by element between models.

* ``probe``: closeness to the base. An independently initialised model of the same
  architecture has weights uncorrelated with the base's, so its distance ``sqrt(1 - cos)``
  per chunk is about 1 (the reference); a derivative's is far below. A paired test
  against the same candidate chunks compared with *other* base
  positions (a derangement) says whether the closeness is more than shared statistics
  (norms, means) of the two models.
* ``screen``: similarity of the task vector ``x - b`` to each homologue's and a non-negative
  least-squares attribution over them, each with a bootstrap interval, and a verdict
  (clone / merge of parents / own fine-tune) whose stability under resampling says whether
  it is borderline (then a full read decides).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import nnls

# "Far below an independent model": at most half the distance of an independently
# initialised model of the same shapes (measured on the same chunks, about 1).
RELATED_MAX_SHARE = 0.5
# One-sided paired z for "closer at the same positions than at other positions".
RELATED_MIN_Z = 4.0
# A homologue counts as a parent from this coefficient up (below: a shared-task echo).
PARENT_MIN_COEFFICIENT = 0.1
# Homologues must explain at least this share of the task vector for a merge / clone.
MERGE_MIN_EXPLAINED = 0.5
# A clone: one parent, coefficient within this of 1, and nearly everything explained.
CLONE_COEF_TOLERANCE = 0.05
CLONE_MIN_EXPLAINED = 0.98
# A verdict that resampling the chunks changes this often is borderline: read everything.
STABLE_SHARE = 0.95
BOOTSTRAP = 200


@dataclass(frozen=True)
class ProbeResult:
    chunks: int
    elements: int
    relative_distance: float
    distance_ci: tuple[float, float]
    matched_cosine: float
    null_cosine: float
    z: float
    reference_distance: float = 1.0

    @property
    def related(self) -> bool:
        return (self.relative_distance <= RELATED_MAX_SHARE * self.reference_distance
                and self.z >= RELATED_MIN_Z)

    def as_dict(self) -> dict[str, float | int | bool | list[float]]:
        return {"chunks": self.chunks, "elements": self.elements,
                "relative_distance": round(self.relative_distance, 5),
                "distance_ci": [round(v, 5) for v in self.distance_ci],
                "matched_cosine": round(self.matched_cosine, 5),
                "null_cosine": round(self.null_cosine, 5), "z": round(self.z, 2),
                "reference_distance": round(self.reference_distance, 5),
                "related": self.related}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _stack(chunks: Sequence[torch.Tensor]) -> list[np.ndarray]:
    return [c.detach().to(torch.float64).numpy() for c in chunks]


def probe(cand: Sequence[torch.Tensor], base: Sequence[torch.Tensor], *, seed: int = 0
          ) -> ProbeResult:
    """Closeness of the candidate's chunks to the base's at the same positions.

    The distance of one chunk pair is ``sqrt(1 - cos)``: about 1 for an independently
    initialised model (uncorrelated weights), 0 for identical ones, and blind to a rescaled
    row. The model's distance is the median over chunks (robust to a few rewritten rows),
    with a bootstrap interval."""
    if len(cand) != len(base) or not cand:
        raise ValueError("probe needs the same non-empty list of chunks from both models")
    xs, bs = _stack(cand), _stack(base)
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(xs):
        by_len.setdefault(x.shape[0], []).append(i)
    matched_all = np.zeros(len(xs))
    matched, null = [], []
    for idx in by_len.values():
        X = np.stack([xs[i] for i in idx])
        B = np.stack([bs[i] for i in idx])
        cos = _cos(X, B)
        matched_all[idx] = cos
        if len(idx) < 2:
            continue
        matched.extend(cos)
        # Paired control: the same candidate chunk against another base position.
        null.extend(_cos(X, np.roll(B, 1, axis=0)))
    d = np.sqrt(np.clip(1.0 - matched_all, 0.0, None))
    dist = float(np.median(d))
    rng = np.random.default_rng(seed)
    # The reference: an independently initialised model of the same shapes (each chunk
    # drawn like the base's: same mean and spread), at the same positions.
    ref = [rng.normal(b.mean(), b.std() or 1.0, b.shape[0]) for b in bs]
    ref_d = [math.sqrt(max(0.0, 1.0 - float(_cos(x[None], r[None])[0])))
             for x, r in zip(xs, ref, strict=True)]
    reference = float(np.median(ref_d))
    n = len(d)
    boots = [float(np.median(d[rng.integers(0, n, n)])) for _ in range(BOOTSTRAP)]
    lo, hi = (float(v) for v in np.quantile(boots, [0.025, 0.975]))
    elements = sum(x.shape[0] for x in xs)
    if not matched:
        return ProbeResult(n, elements, dist, (lo, hi), float(np.mean(matched_all)),
                           float("nan"), 0.0, reference)
    diff = np.array(matched) - np.array(null)
    sd = float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    z = float(diff.mean() / (sd / math.sqrt(len(diff)))) if sd > 0 else (
        math.inf if diff.mean() > 0 else 0.0)
    return ProbeResult(chunks=n, elements=elements, relative_distance=dist,
                       distance_ci=(lo, hi), matched_cosine=float(np.mean(matched)),
                       null_cosine=float(np.mean(null)), z=z, reference_distance=reference)


# --- screening against homologues --------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    relation: str  # clone | merge | finetune
    parents: frozenset[str] = frozenset()

    def describe(self) -> str:
        return self.relation + (f"({', '.join(sorted(self.parents))})" if self.parents else "")


@dataclass(frozen=True)
class Screening:
    verdict: Verdict
    stability: float  # share of bootstrap resamples giving the same verdict
    explained: float
    coefficients: dict[str, float]
    coefficient_ci: dict[str, tuple[float, float]]
    cosines: dict[str, float]
    cosine_ci: dict[str, tuple[float, float]]
    elements: int
    notes: list[str] = field(default_factory=list)

    @property
    def borderline(self) -> bool:
        return self.stability < STABLE_SHARE

    def as_dict(self) -> dict[str, object]:
        r5 = lambda v: round(float(v), 5)  # noqa: E731
        return {
            "verdict": self.verdict.relation, "parents": sorted(self.verdict.parents),
            "stability": r5(self.stability), "borderline": self.borderline,
            "explained": r5(self.explained),
            "coefficients": {k: r5(v) for k, v in self.coefficients.items()},
            "coefficient_ci": {k: [r5(a), r5(b)] for k, (a, b) in self.coefficient_ci.items()},
            "cosines": {k: r5(v) for k, v in self.cosines.items()},
            "cosine_ci": {k: [r5(a), r5(b)] for k, (a, b) in self.cosine_ci.items()},
            "elements": self.elements,
        }


def _verdict(coef: np.ndarray, explained: float, names: list[str]) -> Verdict:
    if explained < MERGE_MIN_EXPLAINED:
        return Verdict("finetune")
    parents = frozenset(n for n, c in zip(names, coef, strict=True)
                        if c >= PARENT_MIN_COEFFICIENT)
    if not parents:
        return Verdict("finetune")
    if len(parents) == 1 and explained >= CLONE_MIN_EXPLAINED:
        c = float(coef[names.index(next(iter(parents)))])
        if abs(c - 1.0) <= CLONE_COEF_TOLERANCE:
            return Verdict("clone", parents)
    return Verdict("merge", parents)


def _solve(G: np.ndarray, b: np.ndarray, s: float) -> tuple[np.ndarray, float, np.ndarray]:
    """NNLS of ``tau`` over the columns of ``T`` from sufficient statistics
    (``G = T'T``, ``b = T'tau``, ``s = tau'tau``): coefficients, explained share, cosines.

    ``||tau - T c||^2 = ||L' c - L^-1 b||^2 + s - ||L^-1 b||^2`` with ``G = L L'``, so the
    k x k problem has the same solution as the full one, whatever the number of rows."""
    k = G.shape[0]
    if k == 0 or s <= 0:
        return np.zeros(k), 0.0, np.zeros(k)
    jitter = 1e-12 * max(float(np.trace(G)) / k, 1e-30)
    L = np.linalg.cholesky(G + jitter * np.eye(k))
    y = np.linalg.solve(L, b)
    coef, _ = nnls(L.T, y)
    resid = float(coef @ G @ coef - 2 * b @ coef + s)
    diag = np.sqrt(np.clip(np.diag(G), 0, None) * s)
    cos = np.where(diag > 0, b / np.where(diag > 0, diag, 1.0), 0.0)
    return coef, 1.0 - max(resid, 0.0) / s, cos


def screen(
    subject: Sequence[torch.Tensor],
    base: Sequence[torch.Tensor],
    homologues: Mapping[str, Sequence[torch.Tensor]],
    *,
    seed: int = 0,
) -> Screening:
    """Similarity and merge attribution of the subject's task vector over the homologues'.

    The chunks are the resampling unit of the bootstrap: each contributes its own
    ``T_i'T_i``, ``T_i'tau_i`` and ``tau_i'tau_i``, so a resample is a weighted sum."""
    b = _stack(base)
    tau_chunks = [x - bb for x, bb in zip(_stack(subject), b, strict=True)]
    names = sorted(homologues)
    h_chunks = [[x - bb for x, bb in zip(_stack(homologues[h]), b, strict=True)]
                for h in names]
    n, k = len(tau_chunks), len(names)
    Gs = np.zeros((n, k, k))
    bs = np.zeros((n, k))
    ss = np.zeros(n)
    for i, t in enumerate(tau_chunks):
        Ti = np.stack([h_chunks[j][i] for j in range(k)], axis=1) if k else np.zeros((len(t), 0))
        Gs[i], bs[i], ss[i] = Ti.T @ Ti, Ti.T @ t, float(t @ t)
    coef, explained, cos = _solve(Gs.sum(0), bs.sum(0), float(ss.sum()))
    verdict = _verdict(coef, explained, names)
    rng = np.random.default_rng(seed)
    same = 0
    boot_coef, boot_cos = [], []
    for _ in range(BOOTSTRAP):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        c, e, cs = _solve(np.tensordot(w, Gs, 1), w @ bs, float(w @ ss))
        boot_coef.append(c)
        boot_cos.append(cs)
        same += _verdict(c, e, names) == verdict
    bc, bcs = np.array(boot_coef), np.array(boot_cos)

    def ci(a: np.ndarray, j: int) -> tuple[float, float]:
        lo, hi = np.quantile(a[:, j], [0.025, 0.975])
        return float(lo), float(hi)

    return Screening(
        verdict=verdict, stability=same / BOOTSTRAP, explained=float(explained),
        coefficients={h: float(coef[j]) for j, h in enumerate(names)},
        coefficient_ci={h: ci(bc, j) for j, h in enumerate(names)},
        cosines={h: float(cos[j]) for j, h in enumerate(names)},
        cosine_ci={h: ci(bcs, j) for j, h in enumerate(names)},
        elements=int(sum(len(t) for t in tau_chunks)),
    )


__all__ = ["ProbeResult", "Screening", "Verdict", "probe", "screen"]
