"""Breadcrumbs and DELLA merges (mergekit ``breadcrumbs`` / ``della``), with their recipes.

- ``breadcrumbs_merge``: each task vector loses its largest ``gamma`` share of magnitudes
  (outliers) and its smallest, keeping ``density`` of the entries in between (per tensor),
  then a weighted sum; ``ties=True`` adds TIES sign election (``breadcrumbs_ties``).
- ``della_merge``: MAGPRUNE: entries are kept with a probability that grows linearly with
  their magnitude rank within the row, from ``density - epsilon`` to ``density + epsilon``,
  and survivors are rescaled by ``1 / p``; then sign election (``della``) or a plain
  weighted sum (``della_linear``), times ``lambda_``.

Densities are per parent (a list), as mergekit allows: a merge whose parents were pruned to
different densities must still be traced to every parent. The recorded coefficient is the
parent's ``weight * lambda_``, which is what every kept coordinate carries (before DELLA's
``1 / p`` rescaling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from auditor_testkit.factory.merge import (
    MergeResult,
    StateDict,
    _check,
    _elect_and_mix,
    _f32,
    _models_cfg,
    _names,
)


def _per_parent(value: float | Sequence[float], n: int, what: str) -> list[float]:
    out = [float(value)] * n if isinstance(value, int | float) else [float(v) for v in value]
    if len(out) != n:
        raise ValueError(f"one {what} per model is needed")
    return out


def _breadcrumb(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep entries ranked (by magnitude, descending) in [gamma, gamma + density) of the
    tensor: the top outliers and the small tail are both removed."""
    n = tau.numel()
    flat = tau.flatten()
    order = torch.argsort(flat.abs(), descending=True)
    lo = round(gamma * n)
    hi = min(n, lo + max(1, round(density * n)))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[lo:hi]] = True
    return (flat * mask).view_as(tau)


def breadcrumbs_merge(
    base: StateDict,
    models: Sequence[StateDict],
    *,
    density: float | Sequence[float],
    gamma: float,
    weights: Sequence[float],
    ties: bool = False,
    lambda_: float = 1.0,
    names: Sequence[str] | None = None,
    base_name: str = "base",
) -> MergeResult:
    """Model Breadcrumbs (see the module docstring); no normalisation, as mergekit's
    ``normalize: false``."""
    dens = _per_parent(density, len(models), "density")
    if len(weights) != len(models):
        raise ValueError("one weight per model is needed")
    out = _mix_pruned(base, models, dens, weights, ties=ties, lambda_=lambda_,
                      prune=lambda tau, d: _breadcrumb(tau, d, gamma))
    method = "breadcrumbs_ties" if ties else "breadcrumbs"
    cfg: dict[str, Any] = {
        "merge_method": method,
        "base_model": base_name,
        "models": _models_cfg(
            _names(names, len(models)),
            [{"weight": w, "density": d, "gamma": gamma} for w, d in zip(weights, dens,
                                                                          strict=True)],
        ),
        "parameters": {"normalize": False, "lambda": lambda_},
        "dtype": "float32",
    }
    return MergeResult(out, cfg, method, tuple(float(w) * lambda_ for w in weights))


def _mix_pruned(
    base: StateDict,
    models: Sequence[StateDict],
    densities: Sequence[float],
    weights: Sequence[float],
    *,
    ties: bool,
    lambda_: float,
    prune: Callable[[torch.Tensor, float], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Prune each parent's task vector (per its density), then mix: with TIES sign election
    or linearly. Breadcrumbs and DELLA differ only in ``prune``."""
    out: dict[str, torch.Tensor] = {}
    for k in _check(models, base):
        b = _f32(base[k])
        taus = [prune(_f32(m[k]) - b, d) for m, d in zip(models, densities, strict=True)]
        if ties:
            mixed = _elect_and_mix(taus, weights, normalize=False)
        else:
            mixed = sum(w * t for w, t in zip(weights, taus, strict=True))
        out[k] = b + lambda_ * mixed
    return out


def magprune(
    tau: torch.Tensor, *, density: float, epsilon: float, gen: torch.Generator
) -> torch.Tensor:
    """DELLA's MAGPRUNE of one tensor: keep probability linear in the magnitude rank within
    each row, in [density - epsilon, density + epsilon]; survivors rescaled by 1 / p."""
    if density >= 1.0:
        return tau
    if not epsilon < density < 1.0 - epsilon:
        raise ValueError("need epsilon < density < 1 - epsilon")
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(torch.float32)
    step = 2.0 * epsilon / max(1, n - 1)
    p = (density - epsilon) + ranks * step
    keep = torch.rand(rows.shape, generator=gen) < p
    return (rows * keep / p).reshape(tau.shape)


def della_merge(
    base: StateDict,
    models: Sequence[StateDict],
    *,
    density: float | Sequence[float],
    epsilon: float,
    weights: Sequence[float],
    seed: int,
    ties: bool = True,
    lambda_: float = 1.0,
    names: Sequence[str] | None = None,
    base_name: str = "base",
) -> MergeResult:
    """DELLA (``ties=True``, sign election) or DELLA-linear (see the module docstring)."""
    dens = _per_parent(density, len(models), "density")
    if len(weights) != len(models):
        raise ValueError("one weight per model is needed")
    gen = torch.Generator().manual_seed(seed)
    out = _mix_pruned(base, models, dens, weights, ties=ties, lambda_=lambda_,
                      prune=lambda tau, d: magprune(tau, density=d, epsilon=epsilon, gen=gen))
    method = "della" if ties else "della_linear"
    cfg: dict[str, Any] = {
        "merge_method": method,
        "base_model": base_name,
        "models": _models_cfg(
            _names(names, len(models)),
            [{"weight": w, "density": d, "epsilon": epsilon}
             for w, d in zip(weights, dens, strict=True)],
        ),
        "parameters": {"normalize": False, "lambda": lambda_},
        "random_seed": seed,
        "dtype": "float32",
    }
    return MergeResult(out, cfg, method, tuple(float(w) * lambda_ for w in weights))


def ties_dare_merge(
    base: StateDict,
    models: Sequence[StateDict],
    *,
    method: str,
    density: Sequence[float],
    weights: Sequence[float],
    seed: int,
    lambda_: float = 1.0,
    names: Sequence[str] | None = None,
    base_name: str = "base",
) -> MergeResult:
    """TIES (``ties``), DARE-TIES (``dare_ties``) or DARE-linear (``dare_linear``) with one
    density per parent (mergekit's per-model ``density``), no normalisation."""
    from auditor_testkit.factory.merge import _trim

    dens = _per_parent(density, len(models), "density")
    if method not in ("ties", "dare_ties", "dare_linear") or len(weights) != len(models):
        raise ValueError(f"bad sparse merge {method!r}")
    keys = _check(models, base)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        b = _f32(base[k])
        taus = []
        for m, d in zip(models, dens, strict=True):
            tau = _f32(m[k]) - b
            if method == "ties":
                taus.append(_trim(tau, d))
            else:
                keep = torch.rand(b.shape, generator=gen) < d
                taus.append(tau * keep / d)
        if method == "dare_linear":
            mixed = sum(w * t for w, t in zip(weights, taus, strict=True))
        else:
            mixed = _elect_and_mix(taus, weights, normalize=False)
        out[k] = b + lambda_ * mixed
    cfg: dict[str, Any] = {
        "merge_method": method,
        "base_model": base_name,
        "models": _models_cfg(
            _names(names, len(models)),
            [{"weight": w, "density": d} for w, d in zip(weights, dens, strict=True)],
        ),
        "parameters": {"normalize": False, "lambda": lambda_},
        "random_seed": seed,
        "dtype": "float32",
    }
    return MergeResult(out, cfg, method, tuple(float(w) * lambda_ for w in weights))


__all__ = ["breadcrumbs_merge", "della_merge", "magprune", "ties_dare_merge"]
