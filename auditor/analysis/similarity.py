"""Cosines and Gram matrices of task vectors, from fingerprints.

Everything downstream (calibration, attribution) works on per-group Gram matrices: the
matrix of estimated full-tensor inner products between every pair of models, summed over
the tensors of a group (a transformer layer, the embeddings, ...). Gram matrices are
M x M whatever the model size, so a subject can be compared with many candidates cheaply,
and an exact linear relation between task vectors (a merge) holds exactly in them because
every fingerprint samples the same coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from auditor.analysis.fingerprint import Fingerprint, group_sort_key
from auditor.errors import AnalysisError


@dataclass(frozen=True)
class GramStack:
    """Per-group second and fourth moments of a set of task vectors.

    ``gram[g, i, j]``   ~ <tau_i, tau_j> over group g (unbiased, from weighted samples);
    ``gram_nz[g]``      the same restricted to coordinates where model 0 (the subject) is
                        nonzero (TIES/DARE fits: trimmed coordinates carry no information);
    ``gram_agree[g]``   as ``gram_nz`` but each model's coordinate also dropped where its
                        sign disagrees with the subject's (TIES sign election drops them);
    ``quart[g, i, j]``  ~ sum of tau_i^2 tau_j^2 (the variance of a cosine under a
                        random-sign null, see ``calibration``);
    ``n_sampled[g]``    sampled coordinates in the group, ``numel[g]`` all of them;
    ``tensor_gram[t]``  ``gram`` for tensor ``keys[t]`` alone (``key_group[t]`` its group):
                        per-tensor coefficients test that a parent's share is uniform.
    """

    names: tuple[str, ...]
    groups: tuple[str, ...]
    gram: np.ndarray
    quart: np.ndarray
    n_sampled: np.ndarray
    numel: np.ndarray
    keys: tuple[str, ...]
    tensor_gram: np.ndarray
    key_group: tuple[int, ...]
    # the fingerprints, for the masked Grams: made when first asked for (two more
    # products per tensor, half of the stack's cost, for fits that rarely want them)
    prints: tuple[Fingerprint, ...] = field(default=(), repr=False, compare=False)

    @cached_property
    def _masked(self) -> tuple[np.ndarray, np.ndarray]:
        gram_nz = np.zeros_like(self.gram)
        gram_agree = np.zeros_like(self.gram)
        for t, key in enumerate(self.keys):
            g = self.key_group[t]
            w = self.prints[0].tensors[key].weight
            a = _rows(self.prints, key)
            nz = a[0] != 0
            if nz.all():  # a dense subject's tensor (the usual case): the same product
                gram_nz[g] += self.tensor_gram[t]
                an = a
            elif nz.any():
                an = a[:, nz]
                gram_nz[g] += w * (an @ an.T)
            if nz.any():
                # the subject itself always "agrees"; others keep coordinates of its sign
                # (a positive product is an agreeing sign)
                sa = an * (an * an[0] > 0)
                gram_agree[g] += w * (sa @ sa.T)
        return gram_nz, gram_agree

    @property
    def gram_nz(self) -> np.ndarray:
        return self._masked[0]

    @property
    def gram_agree(self) -> np.ndarray:
        return self._masked[1]

    @property
    def total(self) -> np.ndarray:
        return self.gram.sum(axis=0)

    @property
    def total_nz(self) -> np.ndarray:
        return self.gram_nz.sum(axis=0)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def cosine(self, i: int, j: int, *, group: int | None = None) -> float:
        g = self.total if group is None else self.gram[group]
        return _cos(g, i, j)

    def group_cosines(self, i: int, j: int) -> dict[str, float]:
        return {g: _cos(self.gram[k], i, j) for k, g in enumerate(self.groups)}

    def null_variance(self, i: int, j: int, *, group: int | None = None) -> float:
        """Variance of the cosine of i and j if their coordinates' signs were independent:
        sum x^2 y^2 / (|x|^2 |y|^2), about 1 / d_eff for near-orthogonal directions."""
        g = self.total if group is None else self.gram[group]
        q = self.quart.sum(axis=0) if group is None else self.quart[group]
        den = g[i, i] * g[j, j]
        if den <= 0:
            return 1.0
        return float(max(q[i, j], 0.0) / den)


def _cos(g: np.ndarray, i: int, j: int) -> float:
    den = math.sqrt(max(g[i, i], 0.0) * max(g[j, j], 0.0))
    if den <= 0:
        return 0.0
    return float(np.clip(g[i, j] / den, -1.0, 1.0))


def shared_keys(prints: Sequence[Fingerprint]) -> list[str]:
    """Tensors every fingerprint holds with the same shape and sample."""
    if not prints:
        return []
    keys = set(prints[0].keys())
    for fp in prints[1:]:
        keys &= set(prints[0].common_keys(fp))
    return sorted(keys)


def build_gram(
    prints: Mapping[str, Fingerprint] | Sequence[tuple[str, Fingerprint]],
    *,
    keys: Sequence[str] | None = None,
) -> GramStack:
    """Gram matrices of the given fingerprints (the first is the subject: ``gram_nz`` is
    masked by its nonzero coordinates)."""
    items = list(prints.items()) if isinstance(prints, Mapping) else list(prints)
    if not items:
        raise AnalysisError("no fingerprints to compare")
    names = tuple(n for n, _ in items)
    fps = [fp for _, fp in items]
    use = list(keys) if keys is not None else shared_keys(fps)
    if not use:
        raise AnalysisError("the fingerprints share no tensors")
    subj = fps[0]
    group_of = {k: subj.tensors[k].group for k in use}
    groups = tuple(sorted(set(group_of.values()), key=group_sort_key))
    gidx = {g: i for i, g in enumerate(groups)}
    m = len(fps)
    gram = np.zeros((len(groups), m, m))
    quart = np.zeros_like(gram)
    n_sampled = np.zeros(len(groups))
    numel = np.zeros(len(groups))
    tensor_gram = np.zeros((len(use), m, m))
    for t, key in enumerate(use):
        g = gidx[group_of[key]]
        t0 = subj.tensors[key]
        w = t0.weight
        a = _rows(fps, key)
        tensor_gram[t] = w * (a @ a.T)
        gram[g] += tensor_gram[t]
        sq = a * a
        # numerator variance of the weighted estimator under random signs: w^2 sum x^2 y^2
        quart[g] += w * w * (sq @ sq.T)
        n_sampled[g] += a.shape[1]
        numel[g] += t0.numel
    return GramStack(
        names=names,
        groups=groups,
        gram=gram,
        quart=quart,
        n_sampled=n_sampled,
        numel=numel,
        keys=tuple(use),
        tensor_gram=tensor_gram,
        key_group=tuple(gidx[group_of[k]] for k in use),
        prints=tuple(fps),
    )


def _rows(fps: Sequence[Fingerprint], key: str) -> np.ndarray:
    """One row per model (the subject first), converted in one call; products are
    a @ a.T. Masks multiply (np.where over a bool mask is ~5x slower here): a dropped
    coordinate becomes a signed zero, which adds nothing to a sum."""
    return np.array([fp.tensors[key].sample for fp in fps], dtype=np.float64)


@dataclass(frozen=True)
class CosineReport:
    """Cosine of two task vectors: global, per group and per tensor, with its standard
    error (0 when both fingerprints hold whole tensors)."""

    cosine: float
    per_group: dict[str, float]
    per_tensor: dict[str, float]
    norm_ratio: float  # |b| / |a| from exact norms
    std_error: float


def cosine_report(a: Fingerprint, b: Fingerprint) -> CosineReport:
    """Compare two task vectors tensor by tensor, group by group and globally."""
    keys = a.common_keys(b)
    if not keys:
        raise AnalysisError("the fingerprints share no tensors")
    per_tensor: dict[str, float] = {}
    for k in keys:
        x = a.tensors[k].sample.astype(np.float64)
        y = b.tensors[k].sample.astype(np.float64)
        den = math.sqrt(float(x @ x) * float(y @ y))
        per_tensor[k] = float(x @ y / den) if den > 0 else 0.0
    stack = build_gram([("a", a), ("b", b)], keys=keys)
    c = stack.cosine(0, 1)
    na = math.sqrt(sum(a.tensors[k].sq_norm for k in keys))
    nb = math.sqrt(sum(b.tensors[k].sq_norm for k in keys))
    err = max(a.cosine_error(c), b.cosine_error(c))
    return CosineReport(
        cosine=c,
        per_group=stack.group_cosines(0, 1),
        per_tensor=per_tensor,
        norm_ratio=nb / na if na > 0 else float("inf"),
        std_error=err,
    )


def cosine(a: Fingerprint, b: Fingerprint) -> float:
    """Global cosine of two task vectors (estimated from the shared samples)."""
    return cosine_report(a, b).cosine
