"""Neuron matching for MLP alignment: which subject neuron is which base neuron.

Split from ``align`` because it stands apart: a greedy sketch match with an exact
assignment only on conflicts, so memory stays bounded by one layer's weights.
"""

from __future__ import annotations

import math

import torch
from scipy.optimize import linear_sum_assignment


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _ls_scale(sub: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per-row least-squares s with sub_row ~ s * base_row."""
    num = (sub.double() * base.double()).sum(dim=1)
    den = (base.double() ** 2).sum(dim=1).clamp_min(1e-30)
    return num / den


def _symmetric_scale(s_fwd: torch.Tensor, s_inv: torch.Tensor) -> torch.Tensor:
    """Combine s (from rows scaled by s) and 1/s (from rows scaled by 1/s): sqrt(s / s')."""
    ratio = (s_fwd / s_inv.where(s_inv.abs() > 1e-30, torch.full_like(s_inv, 1e-30))).abs()
    return torch.sign(s_fwd) * torch.sqrt(ratio)


_SKETCH_DIM = 128
_TOP_K = 4
_ROW_BLOCK = 1024


def _sketch(x: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor:
    u = _unit_rows(x)
    return u if proj is None else _unit_rows(u @ proj)


def _match_neurons(
    g_s: torch.Tensor, g_b: torch.Tensor, u_s: torch.Tensor, u_b: torch.Tensor,
    d_s: torch.Tensor, d_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, score)``: base neuron j <- subject neuron perm[j]; score per base neuron.

    Candidates come from a sketch of the gate rows (never rescaled), scanned in row blocks
    so memory is block x n; they are rescored exactly on all three matrices; the greedy
    best stands where uncontested, and an exact assignment settles the contested rest.
    """
    n, d = g_s.shape
    proj = None
    if d > _SKETCH_DIM:
        gen = torch.Generator().manual_seed(n * 1_000_003 + d)
        proj = torch.randn(d, _SKETCH_DIM, generator=gen) / math.sqrt(_SKETCH_DIM)
    ks, kb = _sketch(g_s, proj), _sketch(g_b, proj)
    k = min(_TOP_K, n)
    cand = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, _ROW_BLOCK):
        sim = ks[start:start + _ROW_BLOCK] @ kb.T
        cand[start:start + _ROW_BLOCK] = sim.topk(k, dim=1).indices
        del sim
    # the same index is always a candidate: an honest neuron is its own best match
    cand[:, -1] = torch.where((cand[:, :-1] == torch.arange(n)[:, None]).any(1),
                              cand[:, -1], torch.arange(n))
    gs, gb = _unit_rows(g_s), _unit_rows(g_b)
    us, ub = _unit_rows(u_s), _unit_rows(u_b)
    ds, db = _unit_rows(d_s.T.contiguous()), _unit_rows(d_b.T.contiguous())

    def exact(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return ((gs[rows] * gb[cols]).sum(-1) + (us[rows] * ub[cols]).sum(-1).abs()
                + (ds[rows] * db[cols]).sum(-1).abs())

    scores = exact(torch.arange(n)[:, None].expand(n, k), cand)
    best_pos = scores.argmax(dim=1)
    best = cand.gather(1, best_pos[:, None]).squeeze(1)
    best_score = scores.gather(1, best_pos[:, None]).squeeze(1)
    counts = torch.bincount(best, minlength=n)
    contested = counts[best] > 1
    sub_to_base = best.clone()
    if bool(contested.any()):
        rows = torch.nonzero(contested).squeeze(1)
        taken = torch.zeros(n, dtype=torch.bool)
        taken[best[~contested]] = True
        free = torch.nonzero(~taken).squeeze(1)
        # dense only over the contested rows and the columns nobody else holds
        sim = ((gs[rows] @ gb[free].T) + (us[rows] @ ub[free].T).abs()
               + (ds[rows] @ db[free].T).abs())
        r, c = linear_sum_assignment(sim.double().numpy(), maximize=True)
        sub_to_base[rows[torch.from_numpy(r)]] = free[torch.from_numpy(c)]
        best_score[rows[torch.from_numpy(r)]] = sim[torch.from_numpy(r), torch.from_numpy(c)]
        del sim
    perm = torch.empty(n, dtype=torch.long)
    perm[sub_to_base] = torch.arange(n)
    return perm, best_score[perm] / 3.0
