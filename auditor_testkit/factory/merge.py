"""Model merges on state dicts, mergekit-style, with their exact recipes.

With base ``theta_B`` and task vectors ``tau_i = theta_i - theta_B``:

- ``linear_merge``: ``sum w_i theta_i`` with ``sum w_i = 1`` (so ``tau = sum w_i tau_i``).
- ``task_arithmetic``: ``theta_B + sum l_i tau_i``.
- ``ties_merge``: trim each ``tau_i`` to its top ``density`` magnitudes per tensor, elect a
  sign per coordinate from the weighted sum, average the agreeing entries (disjoint mean),
  scale by ``lambda_``. Coordinates no parent keeps stay exactly at the base value.
- ``dare_merge``: drop entries with probability ``drop`` and rescale by ``1/(1-drop)``
  (seeded); then linear combination, or TIES-style election with ``ties=True``.
- ``slerp_merge``: two models, per tensor; ``theta = a theta_1 + b theta_2`` with
  ``a + b >= 1``, so ``tau = a tau_1 + b tau_2 + (a + b - 1) theta_B``.
- ``layerwise_merge``: task arithmetic whose coefficient depends on the layer depth.

Each returns a ``MergeResult``: the merged state dict plus a mergekit-style config dict
(``save_repo(..., mergekit_config=result.config)`` writes it as ``mergekit_config.yml``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from auditor.errors import ShapeMismatch

StateDict = Mapping[str, torch.Tensor]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class MergeResult:
    """A merged state dict and its recipe.

    ``coefficients``: one number per parent as the method defines it (linear weights,
    task-arithmetic lambdas, TIES/DARE weights times ``lambda_``, SLERP ``t`` for the
    second model). ``per_layer``: per parent, the coefficient for each layer index
    (layer-wise merges only). ``per_tensor``: for SLERP, ``(a, b)`` per tensor name.
    """

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    method: str
    coefficients: tuple[float, ...]
    per_layer: tuple[tuple[float, ...], ...] | None = None
    per_tensor: dict[str, tuple[float, float]] = field(default_factory=dict)


def _names(names: Sequence[str] | None, n: int) -> list[str]:
    if names is None:
        return [f"model_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} models")
    return list(names)


def _check(models: Sequence[StateDict], base: StateDict | None = None) -> list[str]:
    ref = base if base is not None else models[0]
    keys = list(ref)
    for m in models:
        if set(m) != set(keys):
            raise ShapeMismatch("models to merge hold different tensor names")
        for k in keys:
            if m[k].shape != ref[k].shape:
                raise ShapeMismatch(f"{k}: shape {tuple(m[k].shape)} != {tuple(ref[k].shape)}")
    return keys


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def _models_cfg(
    names: Sequence[str], params: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    return [{"model": n, "parameters": dict(p)} for n, p in zip(names, params, strict=True)]


def linear_merge(
    models: Sequence[StateDict],
    *,
    weights: Sequence[float],
    names: Sequence[str] | None = None,
) -> MergeResult:
    """``sum w_i theta_i``; the weights must sum to 1 (a model soup)."""
    if len(weights) != len(models) or not models:
        raise ValueError("one weight per model is needed")
    if not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ValueError(f"linear weights must sum to 1, got {sum(weights)}")
    keys = _check(models)
    out = {k: sum(w * _f32(m[k]) for w, m in zip(weights, models, strict=True)) for k in keys}
    cfg = {
        "merge_method": "linear",
        "models": _models_cfg(_names(names, len(models)), [{"weight": w} for w in weights]),
        "dtype": "float32",
    }
    return MergeResult(out, cfg, "linear", tuple(float(w) for w in weights))


def task_arithmetic(
    base: StateDict,
    models: Sequence[StateDict],
    *,
    lambdas: Sequence[float],
    names: Sequence[str] | None = None,
    base_name: str = "base",
) -> MergeResult:
    """``theta_B + sum l_i (theta_i - theta_B)``."""
    if len(lambdas) != len(models) or not models:
        raise ValueError("one lambda per model is needed")
    keys = _check(models, base)
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        b = _f32(base[k])
        out[k] = b + sum(lam * (_f32(m[k]) - b) for lam, m in zip(lambdas, models, strict=True))
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base_name,
        "models": _models_cfg(_names(names, len(models)), [{"weight": w} for w in lambdas]),
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    return MergeResult(out, cfg, "task_arithmetic", tuple(float(x) for x in lambdas))


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share of entries with the largest magnitude (per tensor)."""
    if density >= 1.0:
        return tau
    k = int(density * tau.numel())
    if k <= 0:
        return torch.zeros_like(tau)
    flat = tau.abs().flatten()
    # topk indices (not a magnitude threshold) so exactly k entries survive even on ties.
    idx = torch.topk(flat, k, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    return tau * mask.view_as(tau)


def _elect_and_mix(
    taus: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool
) -> torch.Tensor:
    weighted = torch.stack([w * t for w, t in zip(weights, taus, strict=True)])
    elected = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(weighted) == elected) & (weighted != 0)
    mixed = (weighted * agree).sum(dim=0)
    if normalize:
        wt = torch.tensor(list(weights), dtype=torch.float32).view(-1, *([1] * taus[0].dim()))
        divisor = (wt * agree).sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-12, torch.ones_like(divisor), divisor)
        mixed = mixed / divisor
    return mixed


def ties_merge(
    base: StateDict,
    models: Sequence[StateDict],
    *,
    density: float,
    weights: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = True,
    names: Sequence[str] | None = None,
    base_name: str = "base",
) -> MergeResult:
    """TIES: trim to ``density``, elect signs, disjoint (weighted) mean, times ``lambda_``."""
    if not 0.0 < density <= 1.0:
        raise ValueError("density must be in (0, 1]")
    w = list(weights) if weights is not None else [1.0] * len(models)
    keys = _check(models, base)
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        b = _f32(base[k])
        taus = [_trim(_f32(m[k]) - b, density) for m in models]
        out[k] = b + lambda_ * _elect_and_mix(taus, w, normalize=normalize)
    cfg = {
        "merge_method": "ties",
        "base_model": base_name,
        "models": _models_cfg(
            _names(names, len(models)), [{"weight": x, "density": density} for x in w]
        ),
        "parameters": {"normalize": normalize, "lambda": lambda_},
        "dtype": "float32",
    }
    return MergeResult(out, cfg, "ties", tuple(float(x) * lambda_ for x in w))


def dare_merge(
    base: StateDict,
    models: Sequence[StateDict],
    *,
    drop: float,
    weights: Sequence[float],
    seed: int,
    ties: bool = False,
    lambda_: float = 1.0,
    normalize: bool = True,
    names: Sequence[str] | None = None,
    base_name: str = "base",
) -> MergeResult:
    """DARE: drop each task-vector entry with probability ``drop``, rescale survivors by
    ``1/(1-drop)`` (a seeded, per-model mask), then combine linearly (``dare_linear``) or
    with TIES sign election (``dare_ties``)."""
    if not 0.0 <= drop < 1.0:
        raise ValueError("drop must be in [0, 1)")
    if len(weights) != len(models):
        raise ValueError("one weight per model is needed")
    keys = _check(models, base)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        b = _f32(base[k])
        taus = []
        for m in models:
            keep = torch.rand(b.shape, generator=gen) >= drop
            taus.append((_f32(m[k]) - b) * keep / (1.0 - drop))
        if ties:
            mixed = _elect_and_mix(taus, weights, normalize=normalize)
        else:
            mixed = sum(w * t for w, t in zip(weights, taus, strict=True))
        out[k] = b + lambda_ * mixed
    method = "dare_ties" if ties else "dare_linear"
    params: dict[str, Any] = {"lambda": lambda_}
    if ties:
        params["normalize"] = normalize
    cfg = {
        "merge_method": method,
        "base_model": base_name,
        "models": _models_cfg(
            _names(names, len(models)), [{"weight": w, "density": 1.0 - drop} for w in weights]
        ),
        "parameters": params,
        "random_seed": seed,
        "dtype": "float32",
    }
    return MergeResult(out, cfg, method, tuple(float(w) * lambda_ for w in weights))


def slerp_coefficients(
    a: torch.Tensor, b: torch.Tensor, t: float, *, eps: float = 1e-8
) -> tuple[float, float]:
    """mergekit's SLERP weights ``(s0, s1)`` for one tensor pair: ``s0 a + s1 b``."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    na, nb = a64.norm(), b64.norm()
    if na < eps or nb < eps:
        return 1.0 - t, t
    dot = float((a64 / na) @ (b64 / nb))
    if abs(dot) > 0.9995:  # nearly colinear: SLERP degenerates to LERP, as in mergekit
        return 1.0 - t, t
    theta0 = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta0)
    return math.sin((1.0 - t) * theta0) / s, math.sin(t * theta0) / s


def slerp_merge(
    model_a: StateDict,
    model_b: StateDict,
    *,
    t: float,
    names: Sequence[str] | None = None,
    base_name: str | None = None,
) -> MergeResult:
    """Per-tensor spherical interpolation from ``model_a`` (t=0) to ``model_b`` (t=1).

    ``per_tensor`` holds the ``(a, b)`` weights used for each tensor; for SLERP of two
    fine-tunes of one base ``a + b >= 1`` so the merge carries a base term.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError("t must be in [0, 1]")
    keys = _check([model_a, model_b])
    out: dict[str, torch.Tensor] = {}
    per: dict[str, tuple[float, float]] = {}
    for k in keys:
        a, b = _f32(model_a[k]), _f32(model_b[k])
        s0, s1 = slerp_coefficients(a, b, t)
        per[k] = (s0, s1)
        out[k] = (s0 * a.double() + s1 * b.double()).to(torch.float32)
    n = _names(names, 2)
    cfg = {
        "merge_method": "slerp",
        "base_model": base_name or n[0],
        "models": [{"model": n[0]}, {"model": n[1]}],
        "parameters": {"t": t},
        "dtype": "float32",
    }
    return MergeResult(out, cfg, "slerp", (1.0 - t, t), per_tensor=per)


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (``...layers.<i>....``), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def num_layers(state_dict: StateDict) -> int:
    idx = [i for k in state_dict if (i := layer_index(k)) is not None]
    return max(idx) + 1 if idx else 0


def resolve_gradient(values: Sequence[float], n_layers: int) -> list[float]:
    """Interpolate a mergekit-style gradient (a list over depth) to one value per layer."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("empty coefficient list")
    if len(vals) == n_layers:
        return vals
    if len(vals) == 1 or n_layers == 1:
        return [vals[0]] * n_layers
    out = []
    for i in range(n_layers):
        pos = i * (len(vals) - 1) / (n_layers - 1)
        lo = min(math.floor(pos), len(vals) - 2)
        frac = pos - lo
        out.append(vals[lo] * (1 - frac) + vals[lo + 1] * frac)
    return out


def tensor_coefficient(name: str, per_layer: Sequence[float]) -> float:
    """The coefficient a layer-wise merge applies to tensor ``name``: its layer's value;
    embeddings (before the first layer) take the first, the final norm and LM head the
    last."""
    i = layer_index(name)
    if i is not None:
        return per_layer[i]
    return per_layer[0] if "embed" in name else per_layer[-1]


def layerwise_merge(
    base: StateDict,
    models: Sequence[StateDict],
    *,
    coefficients: Sequence[Sequence[float]],
    names: Sequence[str] | None = None,
    base_name: str = "base",
) -> MergeResult:
    """Task arithmetic with a per-layer coefficient list per parent (mergekit gradient).

    Lists shorter than the layer count are interpolated linearly over depth; see
    ``tensor_coefficient`` for tensors outside the decoder layers.
    """
    if len(coefficients) != len(models) or not models:
        raise ValueError("one coefficient list per model is needed")
    keys = _check(models, base)
    n = num_layers(base)
    resolved = [resolve_gradient(c, n) for c in coefficients]
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        b = _f32(base[k])
        out[k] = b + sum(
            tensor_coefficient(k, r) * (_f32(m[k]) - b)
            for r, m in zip(resolved, models, strict=True)
        )
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base_name,
        "models": _models_cfg(
            _names(names, len(models)), [{"weight": list(c)} for c in coefficients]
        ),
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    means = tuple(sum(r) / len(r) for r in resolved)
    return MergeResult(
        out, cfg, "layerwise", means, per_layer=tuple(tuple(r) for r in resolved)
    )


def task_vector(model: StateDict, base: StateDict) -> dict[str, torch.Tensor]:
    """``model - base`` per tensor (float32)."""
    _check([model], base)
    return {k: _f32(model[k]) - _f32(base[k]) for k in base}


__all__ = [
    "MergeResult",
    "dare_merge",
    "layer_index",
    "layerwise_merge",
    "linear_merge",
    "num_layers",
    "resolve_gradient",
    "slerp_coefficients",
    "slerp_merge",
    "task_arithmetic",
    "task_vector",
    "tensor_coefficient",
    "ties_merge",
]
