"""Clones: task vectors nearly identical (same direction and length), and clone groups
among candidates collapsed to their oldest member (a parent and its re-upload explain a
subject equally well, so only the original takes part in a fit)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from itertools import combinations

import numpy as np

from auditor.analysis.fingerprint import Fingerprint
from auditor.analysis.similarity import GramStack

_NON_IDENTIFIABLE = ("v_proj", "o_proj")


def identifiable_keys(stack: GramStack) -> np.ndarray:
    """Tensors an alignment reproduces exactly. A per-head invertible V/O mixing (a
    protected copy) leaves only the products O_h V_h fixed, so how a fine-tune's change
    splits between V and O cannot be recovered; clones are judged without V and O too."""
    return np.array([not any(p in k for p in _NON_IDENTIFIABLE) for k in stack.keys])


def is_clone(
    stack: GramStack, i: int, j: int, ident: np.ndarray, min_cos: float, tol: float
) -> bool:
    gi, gj = float(stack.total[i, i]), float(stack.total[j, j])
    if gi <= 0 or gj <= 0 or abs(math.sqrt(gj / gi) - 1.0) >= tol:
        return False
    c = stack.cosine(i, j)
    if c > min_cos:
        return True
    if not ident.any() or ident.all() or c < 0.95:
        return False
    g = stack.tensor_gram[ident].sum(axis=0)
    den = math.sqrt(max(g[i, i], 0.0) * max(g[j, j], 0.0))
    return den > 0 and g[i, j] / den > min_cos


def _created(name: str, fp: Fingerprint, created_at: Mapping[str, datetime] | None) -> float:
    when = (created_at or {}).get(name)
    if when is None and fp.meta.get("created_at"):
        try:
            when = datetime.fromisoformat(str(fp.meta["created_at"]).replace("Z", "+00:00"))
        except ValueError:
            when = None
    return when.timestamp() if when is not None else math.inf


def clone_groups(
    stack: GramStack,
    names: Sequence[str],
    cidx: Mapping[str, int],
    ident: np.ndarray,
    min_cos: float,
    tol: float,
    prints: Mapping[str, Fingerprint],
    created_at: Mapping[str, datetime] | None,
) -> dict[str, list[str]]:
    """Representative -> its other copies, for groups of mutual clones among candidates.
    The oldest is the representative (a copy cannot predate its original); without dates
    the first in the caller's order."""
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b in combinations(names, 2):
        if is_clone(stack, cidx[a], cidx[b], ident, min_cos, tol):
            parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(find(n), []).append(n)
    order = {n: i for i, n in enumerate(names)}
    out: dict[str, list[str]] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda n: (_created(n, prints[n], created_at), order[n]))
        out[members[0]] = members[1:]
    return out
