"""Function-preserving disguises and clones of Llama-style state dicts.

Disguises change the weights but not the function (outputs equal up to float error):

- ``permute_mlp``: permute each layer's MLP neurons; ``up`` rows are also scaled by ``c``
  and ``down`` columns by ``1/c``. ``gate`` rows are only permuted, because SiLU is not
  scale-equivariant (``silu(c x) != c silu(x)``) while the product ``silu(g) * u`` is linear
  in ``u``.
- ``rescale_heads``: per head, ``q`` rows times ``a`` and ``k`` rows times ``1/a`` (RoPE
  rotates within a head, so it commutes with a scalar), ``v`` rows times ``b`` and the
  matching ``o`` columns times ``1/b``; optionally permute whole heads.
- ``protect``: a MergeLock/PaRaMS-style "protected copy": MLP permutation with large
  random scales, large per-head q/k scales, and a random invertible matrix per head
  between ``v`` and ``o``; merging it with its siblings breaks, alone it works.

Clones: ``clone`` (identical re-upload), ``cast`` (fp16 / bf16), ``add_noise``.
Every function returns a new state dict and leaves its input untouched; disguises also
report what they did (``DisguiseResult.info``) as ground truth for alignment tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from auditor_testkit.factory.merge import num_layers

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class DisguiseResult:
    """The disguised state dict and the transform applied.

    ``info`` keys: ``mlp_perm`` {layer: list[int]} (new neuron j = old neuron perm[j]),
    ``mlp_scale`` {layer: list[float]}, ``head_perm`` {layer: list[int]},
    ``qk_scale`` / ``vo_scale`` {layer: list[float]} per (new) head, ``vo_matrix`` flag.
    """

    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def _copy(sd: StateDict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


def _log_uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def permute_mlp(
    state_dict: StateDict,
    *,
    seed: int,
    scale_range: tuple[float, float] | None = (0.5, 2.0),
) -> DisguiseResult:
    """Permute MLP neurons of every layer; scale ``up`` rows by ``c`` (log-uniform in
    ``scale_range``, None for a pure permutation) and ``down`` columns by ``1/c``."""
    sd = _copy(state_dict)
    gen = torch.Generator().manual_seed(seed)
    perms: dict[int, list[int]] = {}
    scales: dict[int, list[float]] = {}
    for layer in range(num_layers(sd)):
        p = _prefix(layer) + "mlp."
        gate, up, down = (sd[p + n + "_proj.weight"] for n in ("gate", "up", "down"))
        n = up.shape[0]
        perm = torch.randperm(n, generator=gen)
        c = (
            _log_uniform(gen, n, *scale_range)
            if scale_range
            else torch.ones(n, dtype=torch.float64)
        )
        # Compute in float64 so the disguise adds no error beyond the final rounding.
        sd[p + "gate_proj.weight"] = gate[perm].clone()
        sd[p + "up_proj.weight"] = (up[perm].double() * c[:, None]).to(up.dtype)
        sd[p + "down_proj.weight"] = (down[:, perm].double() / c[None, :]).to(down.dtype)
        perms[layer] = perm.tolist()
        scales[layer] = c.tolist()
    return DisguiseResult(sd, {"mlp_perm": perms, "mlp_scale": scales})


def _head_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    return w.view(num_heads, w.shape[0] // num_heads, w.shape[1])


def rescale_heads(
    state_dict: StateDict,
    *,
    num_heads: int,
    seed: int,
    qk_range: tuple[float, float] = (0.5, 2.0),
    vo_range: tuple[float, float] = (0.5, 2.0),
    permute: bool = False,
    vo_matrix: bool = False,
) -> DisguiseResult:
    """Per-head rescaling (``q*a, k/a, v*b, o/b``), optionally a head permutation and,
    with ``vo_matrix``, a random invertible ``M`` per head (``v -> M v``, ``o -> o M^-1``).

    Needs ``num_key_value_heads == num_attention_heads`` (the factory's models).
    """
    sd = _copy(state_dict)
    gen = torch.Generator().manual_seed(seed)
    info: dict[str, Any] = {"head_perm": {}, "qk_scale": {}, "vo_scale": {}, "vo_matrix": vo_matrix}
    for layer in range(num_layers(sd)):
        p = _prefix(layer) + "self_attn."
        q, k, v, o = (sd[p + n + "_proj.weight"] for n in ("q", "k", "v", "o"))
        if k.shape[0] != q.shape[0]:
            raise ValueError("head disguises need num_key_value_heads == num_attention_heads")
        hd = q.shape[0] // num_heads
        perm = torch.randperm(num_heads, generator=gen) if permute else torch.arange(num_heads)
        a = _log_uniform(gen, num_heads, *qk_range)
        b = _log_uniform(gen, num_heads, *vo_range)
        qh = _head_rows(q.double(), num_heads)[perm] * a[:, None, None]
        kh = _head_rows(k.double(), num_heads)[perm] / a[:, None, None]
        vh = _head_rows(v.double(), num_heads)[perm] * b[:, None, None]
        # o's columns are grouped by head: (hidden, H, hd).
        oh = o.double().view(o.shape[0], num_heads, hd)[:, perm] / b[None, :, None]
        if vo_matrix:
            for h in range(num_heads):
                m = torch.linalg.qr(torch.randn(hd, hd, generator=gen, dtype=torch.float64))[0]
                m = m @ torch.diag(_log_uniform(gen, hd, 0.5, 2.0))
                vh[h] = m @ vh[h]
                oh[:, h] = oh[:, h] @ torch.linalg.inv(m)
        sd[p + "q_proj.weight"] = qh.reshape(q.shape).to(q.dtype)
        sd[p + "k_proj.weight"] = kh.reshape(k.shape).to(k.dtype)
        sd[p + "v_proj.weight"] = vh.reshape(v.shape).to(v.dtype)
        sd[p + "o_proj.weight"] = oh.reshape(o.shape).to(o.dtype)
        info["head_perm"][layer] = perm.tolist()
        info["qk_scale"][layer] = a.tolist()
        info["vo_scale"][layer] = b.tolist()
    return DisguiseResult(sd, info)


def disguise(
    state_dict: StateDict,
    *,
    num_heads: int,
    seed: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
) -> DisguiseResult:
    """The usual theft disguise: MLP permutation + rescale, then per-head rescaling."""
    mlp = permute_mlp(state_dict, seed=seed, scale_range=scale_range)
    heads = rescale_heads(
        mlp.state_dict, num_heads=num_heads, seed=seed + 1, qk_range=scale_range,
        vo_range=scale_range,
    )
    return DisguiseResult(heads.state_dict, {**mlp.info, **heads.info})


def protect(
    state_dict: StateDict,
    *,
    num_heads: int,
    seed: int,
    scale: tuple[float, float] = (0.05, 20.0),
) -> DisguiseResult:
    """A merge-resistant "protected copy" (MergeLock/PaRaMS-style): large random MLP and
    head scales (log-uniform in ``scale``, both directions), permuted neurons and heads,
    and a random invertible V/O mixing per head. Same function, weights far from every
    sibling, so averaging it with one breaks the merge."""
    mlp = permute_mlp(state_dict, seed=seed, scale_range=scale)
    heads = rescale_heads(
        mlp.state_dict, num_heads=num_heads, seed=seed + 1, qk_range=scale, vo_range=scale,
        permute=True, vo_matrix=True,
    )
    return DisguiseResult(heads.state_dict, {**mlp.info, **heads.info, "protected": True})


def clone(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """An identical re-upload."""
    return _copy(state_dict)


def cast(state_dict: StateDict, *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A dtype-cast clone (e.g. ``torch.float16`` or ``torch.bfloat16``)."""
    return {k: v.detach().to(dtype).clone() for k, v in state_dict.items()}


def add_noise(
    state_dict: StateDict, *, seed: int, relative_std: float = 1e-3
) -> dict[str, torch.Tensor]:
    """A near-clone: Gaussian noise of ``relative_std`` times each tensor's own std."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        x = v.detach().to(torch.float32)
        std = float(x.std()) if x.numel() > 1 else float(x.abs().mean())
        noise = torch.randn(x.shape, generator=gen) * (relative_std * max(std, 1e-8))
        out[k] = (x + noise).to(v.dtype)
    return out


__all__ = [
    "DisguiseResult",
    "add_noise",
    "cast",
    "clone",
    "disguise",
    "permute_mlp",
    "protect",
    "rescale_heads",
]
