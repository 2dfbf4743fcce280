"""Searches for an exact parent set (``verdicts.recipe_residual`` at rounding level): the
smallest set among the most similar candidates, the one candidate that completes an
inexact set, the pruning of members an exact set does not need, and the clone candidates
a subject is an exact merge of."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np

from auditor.analysis.attribution import solve
from auditor.analysis.similarity import GramStack
from auditor.analysis.verdicts import MIN_SHARE, group_residual, recipe_residual, typical_norm

__all__ = ["complete_exact", "exact_search", "merged_not_copied", "prune_exact"]


def exact_search(
    stack: GramStack, pool: Sequence[int], *, base: int | None, threshold: float,
    max_size: int = 4, top: int = 10, scale: float | None = None,
) -> list[int] | None:
    """The smallest set of candidates (among the ``top`` most similar in ``pool``) that
    reproduces the subject exactly, group by group; a larger set is taken only when it
    leaves ten times less. Greedy selection misses such a set when one candidate is itself
    a merge of the parents or the parents are siblings (each alone explains much)."""
    ranked = sorted(pool, key=lambda j: -abs(stack.cosine(0, j)))[:top]
    best_by_size: list[tuple[float, list[int]]] = []
    for size in range(1, min(max_size, len(ranked)) + 1):
        best: tuple[float, list[int]] | None = None
        for combo in combinations(ranked, size):
            f = solve(stack.total, list(combo), base=base)
            if min(f.coefficients) < 0.02:
                continue
            r = group_residual(stack, combo, base, scale)
            if best is None or r < best[0]:
                best = (r, list(combo))
        if best is None:
            continue
        best_by_size.append(best)
    chosen: list[int] | None = None
    for i, (r, members) in enumerate(best_by_size):
        if r > threshold:
            continue
        nxt = best_by_size[i + 1][0] if i + 1 < len(best_by_size) else math.inf
        if nxt >= 0.1 * r:
            return members
        chosen = chosen or members
    return chosen



def complete_exact(
    stack: GramStack, members: Sequence[int], pool: Sequence[int], base: int | None,
    scale: float, threshold: float, *, tries: int = 5,
) -> list[int] | None:
    """``members`` and one more candidate (of the ``tries`` most aligned with what they
    leave unexplained) that make the recipe exact, or None: a third parent from another
    domain (cosine 0.2) is no forward step once two siblings explain 0.96, nor among the
    ten most similar to the subject that ``exact_search`` tries."""
    if not members or len(members) >= 4:
        return None
    g = stack.total
    fit = solve(g, list(members), base=base)
    cols = [*members, *([base] if base is not None else [])]
    coef = np.array([*fit.coefficients, *([fit.base_coefficient or 0.0] if base is not None
                                          else [])])
    rest = [j for j in pool if j not in members]  # by <tau_j, subject - fit> / |tau_j|
    score = {j: abs(g[j, 0] - float(g[j, cols] @ coef)) / math.sqrt(max(g[j, j], 1e-300))
             for j in rest}
    for j in sorted(rest, key=lambda j: -score[j])[:tries]:
        trial = [*members, j]
        f = solve(g, trial, base=base)
        if min(f.coefficients) >= MIN_SHARE and \
                recipe_residual(stack, trial, base, scale) <= threshold:
            return trial
    return None



def prune_exact(
    stack: GramStack, members: Sequence[int], base: int | None, scale: float,
    threshold: float,
) -> list[int]:
    """An exact set with no member it stays exact without: a layer-wise merge's global
    fit takes in a sibling of one parent to mimic the per-layer weights, and the
    tensor-by-tensor recipe (``recipe_residual``, the gate) is still exact with the
    sibling at ~0 (a false parent)."""
    out = list(members)
    while len(out) > 1:
        trials = [(recipe_residual(stack, [m for m in out if m != j], base, scale), j)
                  for j in out]
        r, j = min(trials)
        if r > threshold:
            break
        out.remove(j)
    return out



def merged_not_copied(
    stack: GramStack, clones: set[str], fitted: Sequence[str], cidx: Mapping[str, int],
    base: int | None, threshold: float,
) -> set[str]:
    """Clone candidates the subject is an exact merge of, with other candidates: a mix
    weighted 0.7 towards one of two same-data siblings is as close to it as a re-upload,
    but a copy (cast, noise) never becomes exact by adding another model."""
    out: set[str] = set()
    pool = [cidx[n] for n in fitted]
    for c in clones:
        j = cidx[c]
        scale = typical_norm(stack, [j, *pool])
        if recipe_residual(stack, [j], base, scale) <= threshold:
            continue  # the copy alone is exact
        found = exact_search(stack, [j, *pool], base=base, threshold=threshold, scale=scale)
        if found and j in found and len(found) >= 2:
            out.add(c)
    return out
