"""Parents and coefficients of a sparse merge (TIES, DARE, Breadcrumbs, DELLA).

Every coordinate the merge kept is ``sum_{i in S} c_i x_i`` over the subset S of parents
that survived trimming / dropping and the sign election (``attribution.subset_refit``);
with the true parents that holds *exactly* on nearly every kept coordinate (DELLA: up to
its per-entry 1/p rescaling). A sibling of a parent never reproduces coordinates exactly,
so the parents are chosen by how much of the subject's kept coordinates they reproduce,
not by how correlated they are: siblings share a data direction, not the merge's values.

Densities may differ from parent to parent: a parent pruned to 30% still reproduces its
own 30% exactly, so every parent is kept with its own coefficient.

How each parent's entries were kept is read off the fit itself (``DropProfile``): the
share of its entries kept against their magnitude rank. A magnitude cut (TIES trims the
small entries, Breadcrumbs also the top outliers) keeps by rank, deterministically, and
rescales nothing; a random drop keeps a share at every rank and rescales the survivors
by 1/p: flat in rank for DARE, rising with rank for DELLA. The recipe coefficient
(weight x lambda) is fitted with each entry divided by its own keep probability, so it
does not depend on which method name the signatures pick.

Every parent must earn its place against a null: its column is replaced by what the
other parents explain of it plus the rest shuffled within each tensor (same values, no
relation to the subject). The per-coordinate subset choice lets any extra column shave
the residual a little, and a sibling of a parent or a merge containing one shares the
parents' data direction; only a parent whose own values the subject carries fits
clearly better than its shuffled stand-in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from auditor.analysis import drop_profile as dp
from auditor.analysis.attribution import subset_refit
from auditor.analysis.drop_profile import DropProfile, Layout, rescale_kind
from auditor.analysis.fingerprint import Fingerprint

# |y - fit| below this share of |y| (plus a rounding floor): the coordinate is reproduced
EXACT_RTOL = 1e-3
MAX_PARENTS = 4
PRESELECT = 12
FORWARD_COORDS = 16384
# A candidate is a published merge of others when they leave this share of its norm^2
EXACT_MIX = 1e-4
MIN_COEFFICIENT = 0.08
# A parent must beat its shuffled stand-in by this much (R^2 + exact share)
NULL_MARGIN = 0.02
NULL_DRAWS = 2
# A sparse merge routed by ``sparse_screen`` is reproduced nearly whole by the full fit:
# a fine-tune whose published child is a sparse merge of it is reproduced by that child
# only where the child kept it alone, never on the rest of its coordinates
ROUTED_EXACT = 0.8


@dataclass(frozen=True)
class SparseFit:
    """Sparse parents (names), coefficients, and the evidence behind them."""

    parents: tuple[str, ...]
    coefficients: tuple[float, ...]  # effective: as the kept coordinates carry them
    explained: float  # R^2 on the subject's nonzero coordinates
    exact_fraction: float  # nonzero coordinates reproduced within EXACT_RTOL
    keep_rates: tuple[float, ...]  # per parent: share of its moved coordinates kept
    # where two parents pull opposite ways and the subject moved: the share that kept
    # both (a weighted sum); 0 under TIES sign election, which keeps one side only
    conflict_both: float | None = None
    recipe: tuple[float, ...] = ()  # weight x lambda per parent (rescaling undone)
    rescale: str = "none"  # none (magnitude cut) | dare (flat random) | della (graded)
    profiles: tuple[DropProfile, ...] = ()
    null_gaps: tuple[float, ...] = ()  # per parent: score over its shuffled stand-in
    rejected: tuple[str, ...] = ()  # selected, then no better than a shuffled stand-in


Evaluation = tuple[np.ndarray, float, float, np.ndarray]  # coefs, R^2, exact, mask


def _row(fp: Fingerprint, keys: Sequence[str], step: int) -> np.ndarray:
    """The sampled coordinates of ``keys`` end to end, every ``step``-th, in float64
    (joined in their stored float32 and cut first: 50 candidates of a 1B model are
    ~27M coordinates, and a screen on a subsample converted them all)."""
    return np.concatenate([fp.tensors[k].sample for k in keys])[::step].astype(np.float64)


def _selection(
    subject: Fingerprint, candidates: Mapping[str, Fingerprint], pool: Sequence[str],
    keys: Sequence[str], base: Fingerprint | None,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """The arrays forward selection ranks candidate sets on: it tries many, and an even
    subsample of ~``FORWARD_COORDS`` coordinates is plenty to rank them."""
    size = sum(subject.tensors[k].sample.size for k in keys)
    step = max(1, -(-size // FORWARD_COORDS))
    return _arrays(subject, {n: candidates[n] for n in pool}, keys, base, step)


class _FullRows(dict[str, np.ndarray]):
    """Every sampled coordinate of a candidate, made when first asked for."""

    def __init__(self, prints: Mapping[str, Fingerprint], keys: Sequence[str]) -> None:
        super().__init__()
        self._prints = prints
        self._keys = keys

    def __missing__(self, name: str) -> np.ndarray:
        row = self[name] = _row(self._prints[name], self._keys, 1)
        return row


def _arrays(
    subject: Fingerprint, prints: Mapping[str, Fingerprint], keys: Sequence[str],
    base: Fingerprint | None, step: int = 1,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    y = _row(subject, keys, step)
    xs = {n: _row(fp, keys, step) for n, fp in prints.items()}
    if base is not None and all(k in base.tensors for k in keys):
        scale = np.abs(_row(base, keys, step))
    else:
        scale = np.zeros_like(y)
    # float32 weights minus float32 base: rounding at ~1e-6 of the weight's magnitude
    return y, xs, 1e-6 * scale + 1e-12


def _assign(y: np.ndarray, x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Per coordinate, the subset of nonzero parents that best reproduces y: (n, p) mask."""
    p = x.shape[1]
    subsets = np.array([[(s >> i) & 1 for i in range(p)] for s in range(1, 2**p)], dtype=bool)
    sub_f = subsets.T.astype(float)
    err = np.abs((x * c[None, :]) @ sub_f - y[:, None])
    zero = x == 0
    if zero.any():
        err[(zero.astype(float) @ sub_f) > 0] = np.inf
    return subsets[np.argmin(err, axis=1)]


def _evaluate(
    y: np.ndarray, x: np.ndarray, floor: np.ndarray, inits: Sequence[float] = (1.0,)
) -> Evaluation:
    nz = y != 0
    yn, xn, fl = y[nz], x[nz], floor[nz]
    ls, *_ = np.linalg.lstsq(xn, yn, rcond=None)
    ls = np.clip(ls, 1e-3, None)
    modes = _ratio_modes(yn, xn, ls)
    best: Evaluation | None = None
    # the alternation has local optima: start from the exact ratios where they show,
    # then from the least-squares mix and from it scaled up (rescaled survivors carry
    # 1/(1-p) times the recipe's weight)
    for start in (modes, *(ls * scale for scale in inits)):
        c = subset_refit(yn, xn, start, iterations=30)
        mask = _assign(yn, xn, c)
        pred = (xn * mask * c[None, :]).sum(axis=1)
        resid = yn - pred
        explained = 1.0 - float(resid @ resid) / max(float(yn @ yn), 1e-300)
        exact = float(np.mean(np.abs(resid) <= EXACT_RTOL * np.abs(yn) + fl)) if yn.size else 0.0
        if best is None or explained + exact > best[1] + best[2]:
            best = (c, explained, exact, mask)
        if exact > 0.9:
            break
    assert best is not None
    return best


def _ratio_modes(y: np.ndarray, x: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Per parent, the value y / x_i takes most often: where parent i alone survived, the
    ratio is its effective coefficient exactly, again and again (a sibling's ratios
    scatter). Falls back to ``fallback`` when no value repeats."""
    out = np.array(fallback, dtype=float)
    for i in range(x.shape[1]):
        ok = (x[:, i] != 0) & (y != 0)
        r = y[ok] / x[ok, i]
        r = r[(r > 1e-2) & (r < 1e2)]
        if r.size < 50:
            continue
        bins = np.round(np.log(r) / 2e-4).astype(np.int64)
        vals, counts = np.unique(bins, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] >= max(20, 0.02 * r.size):
            out[i] = float(np.median(r[bins == vals[top]]))
    return out


def _forward(
    y: np.ndarray, xs: Mapping[str, np.ndarray], floor: np.ndarray, pool: Sequence[str],
    min_gain: float, start: Sequence[str] = (),
) -> list[str]:
    """Forward selection by R^2 + exact share (from ``start``), then backward elimination."""
    chosen: list[str] = list(start)
    best: Evaluation = (np.zeros(0), 0.0, 0.0, np.zeros((0, 0), dtype=bool))
    if chosen:
        best = _evaluate(y, np.stack([xs[c] for c in chosen], axis=1), floor)
    for _ in range(2 * MAX_PARENTS):  # a parent may be added, then collapse
        if len(chosen) >= MAX_PARENTS:
            break
        trial_best: tuple[float, str, Evaluation] | None = None
        for n in _shortlist(y, xs, pool, chosen, best):
            cols = [*chosen, n]
            res = _evaluate(y, np.stack([xs[c] for c in cols], axis=1), floor)
            # R^2 and exactness both count: a last small parent adds little R^2 but
            # turns most of its coordinates exact
            score = res[1] + res[2]
            if score - best[1] - best[2] >= min_gain and res[0][-1] >= MIN_COEFFICIENT and (
                    trial_best is None or score > trial_best[0]):
                trial_best = (score, n, res)
        if trial_best is None:
            break
        chosen.append(trial_best[1])
        best = trial_best[2]
        # a parent whose coefficient collapsed was a stand-in for the others
        keep = [i for i, c in enumerate(best[0]) if c >= MIN_COEFFICIENT]
        if len(keep) < len(chosen):
            chosen = [chosen[i] for i in keep]
            best = _evaluate(y, np.stack([xs[c] for c in chosen], axis=1), floor)
    # backward elimination: a parent the others make redundant (a merge of the parents
    # picked first, say) is dropped
    for n in list(chosen):
        if len(chosen) < 2:
            break
        rest = [c for c in chosen if c != n]
        res = _evaluate(y, np.stack([xs[c] for c in rest], axis=1), floor)
        if res[1] + res[2] >= best[1] + best[2] - 0.005:
            chosen, best = rest, res
    return chosen


def _shortlist(
    y: np.ndarray, xs: Mapping[str, np.ndarray], pool: Sequence[str], chosen: Sequence[str],
    best: Evaluation,
) -> list[str]:
    """The ``PRESELECT`` candidates most aligned with what the parents chosen so far leave
    unexplained (the subject itself at first): in a family rich in siblings of one parent,
    a smaller parent ranks low against the subject but first against the residual."""
    nz = y != 0
    r = y[nz]
    if chosen:
        x = np.stack([xs[c][nz] for c in chosen], axis=1)
        r = r - (x * best[3] * best[0][None, :]).sum(axis=1)
    rn = float(np.linalg.norm(r))

    def align(n: str) -> float:
        v = xs[n][nz]
        return abs(float(v @ r)) / max(float(np.linalg.norm(v)) * rn, 1e-300)

    rest = [n for n in pool if n not in chosen]
    return sorted(rest, key=lambda n: -align(n))[:PRESELECT]


def _exact_members(xs: Mapping[str, np.ndarray], name: str, others: Sequence[str]) -> list[str]:
    """The candidates ``name`` is an exact non-negative mix of (a published merge of
    them), or [] when it is not one."""
    from scipy.optimize import nnls

    v = xs[name]
    vv = float(v @ v)
    if vv <= 0 or not others:
        return []
    ranked = sorted(others, key=lambda n: -abs(float(xs[n] @ v))
                    / max(float(np.linalg.norm(xs[n])), 1e-300))[:PRESELECT]
    a = np.stack([xs[n] for n in ranked], axis=1)
    coef, _ = nnls(a, v)
    resid = v - a @ coef
    if float(resid @ resid) > EXACT_MIX * vv:
        return []
    return [n for n, c in zip(ranked, coef, strict=True) if c >= 0.02]


def _score(y: np.ndarray, xs: Mapping[str, np.ndarray], floor: np.ndarray,
           chosen: Sequence[str]) -> float:
    res = _evaluate(y, np.stack([xs[c] for c in chosen], axis=1), floor)
    return res[1] + res[2]


def _expand_merged(
    y: np.ndarray, xs: Mapping[str, np.ndarray], floor: np.ndarray, pool: Sequence[str],
    chosen: list[str], min_gain: float,
) -> list[str]:
    """A chosen candidate that is itself an exact mix of other candidates (a published
    merge that holds some of the parents) stands in for them and blocks the exact fit:
    its members are tried instead, and kept when they fit better."""
    for name in list(chosen):
        if name not in chosen:
            continue
        members = _exact_members(xs, name, [n for n in pool if n != name])
        rest = [n for n in chosen if n != name]
        new = [n for n in members if n not in rest]
        room = MAX_PARENTS - len(rest)
        if not members or room < 0:
            continue
        # its members in its place when they fit, and it dropped alone: a three-model
        # merge standing in for one parent of a three-parent merge, chosen beside that
        # parent, only blocks the exact fit, and its other members are no parents. Each
        # trial completed by forward selection (without the stand-in) before it is
        # judged: dropping it alone fits worse until the parent it hid comes in
        others = [n for n in pool if n != name]
        done = [_forward(y, xs, floor, others, min_gain, start=rest + sub)
                for sub in ([], new) if len(sub) <= room and (sub or set(members) & set(rest))]
        best, trial = max(((_score(y, xs, floor, t), t) for t in done if t),
                          key=lambda st: st[0], default=(-math.inf, []))
        if best >= _score(y, xs, floor, chosen) + min_gain:
            chosen = trial
    return chosen


@dataclass(frozen=True)
class _Final:
    chosen: list[str]
    x: np.ndarray  # the columns in the recipe's frame (divided by keep probabilities)
    effective: Evaluation
    recipe: Evaluation
    profiles: tuple[DropProfile, ...]
    kind: str


def _final(
    y: np.ndarray, xs: Mapping[str, np.ndarray], floor: np.ndarray, layout: Layout,
    chosen: list[str],
) -> _Final:
    inits = (1.0, 1.5, 2.0, 3.0)
    x = np.stack([xs[c] for c in chosen], axis=1)
    best = _evaluate(y, x, floor, inits=inits)
    keep = [i for i, c in enumerate(best[0]) if c >= MIN_COEFFICIENT]
    if 0 < len(keep) < len(chosen):
        chosen = [chosen[i] for i in keep]
        x = x[:, keep]
        best = _evaluate(y, x, floor, inits=inits)
    profs = dp.profiles(y, x, best[3], layout)
    kind = rescale_kind(profs)
    if kind == "none":
        return _Final(chosen, x, best, best, profs, kind)
    # each entry divided by its own keep probability: the fit then carries the recipe's
    # weight x lambda, and DELLA's rank-dependent 1/p no longer blurs the coordinates
    xr = x / dp.keep_probability(x, profs, kind, layout)
    # survivors are already scaled back here: no need to start from scaled-up mixes
    return _Final(chosen, xr, best, _evaluate(y, xr, floor), profs, kind)


def _null_gaps(
    y: np.ndarray, x: np.ndarray, floor: np.ndarray, layout: Layout
) -> list[float]:
    """Per parent, the fit's score over the best of ``NULL_DRAWS`` fits in which that
    parent's column is replaced by a stand-in: the part the other parents explain, plus
    the rest shuffled within each tensor. Scored on an even subsample of the coordinates
    (the gap of a true parent is tens of times the sampling noise)."""
    rng = np.random.default_rng(0)  # the null must not change from one audit to the next
    step = max(1, -(-y.size // FORWARD_COORDS))
    real = _evaluate(y[::step], x[::step], floor[::step])
    score = real[1] + real[2]
    gaps = []
    for i in range(x.shape[1]):
        others = np.delete(x, i, axis=1)
        col = x[:, i]
        if others.shape[1]:
            beta, *_ = np.linalg.lstsq(others, col, rcond=None)
            shared = others @ beta
        else:
            shared = np.zeros_like(col)
        rest = col - shared
        null_best = -np.inf
        for _ in range(NULL_DRAWS):
            shuffled = np.empty_like(rest)
            for seg in layout.segments:
                shuffled[seg] = rng.permutation(rest[seg])
            xn = x.copy()
            xn[:, i] = shared + shuffled
            res = _evaluate(y[::step], xn[::step], floor[::step])
            null_best = max(null_best, res[1] + res[2])
        gaps.append(score - null_best)
    return gaps


def fit_sparse(
    subject: Fingerprint,
    candidates: Mapping[str, Fingerprint],
    *,
    keys: Sequence[str],
    order: Sequence[str],
    base: Fingerprint | None = None,
    min_gain: float = 0.02,
) -> SparseFit:
    """Forward selection of sparse parents among ``order`` (each round tries the
    ``PRESELECT`` most aligned with the residual) by the share of the subject's kept
    coordinates they reproduce; then every parent is tested against its shuffled
    stand-in, and the weakest failing one dropped until all pass."""
    pool = [n for n in order if n in candidates]
    y, _, floor = _arrays(subject, {}, keys, base)
    layout = dp.layout(subject, keys)
    # the final fit and the null test use every coordinate, of the chosen candidates only
    ys, xss, fs = _selection(subject, candidates, pool, keys, base)
    xs = _FullRows(candidates, keys)
    chosen = _expand_merged(ys, xss, fs, pool, _forward(ys, xss, fs, pool, min_gain), min_gain)
    rejected: list[str] = []
    while chosen:
        fin = _final(y, xs, floor, layout, chosen)
        chosen = fin.chosen
        rec = fin.recipe
        gaps = _null_gaps(y, fin.x, floor, layout)
        worst = int(np.argmin(gaps))
        if gaps[worst] < NULL_MARGIN:
            # a stand-in (a sibling, or a merge holding one) may have kept the true
            # parent out: the selection goes on from the parents that passed, without it
            rejected.append(chosen[worst])
            rest = [c for j, c in enumerate(chosen) if j != worst]
            chosen = _forward(ys, xss, fs, [n for n in pool if n not in rejected], min_gain,
                              start=rest)
            continue
        eff = fin.effective
        return SparseFit(
            tuple(chosen), tuple(float(c) for c in eff[0]), rec[1], rec[2],
            tuple(p.keep_rate for p in fin.profiles), _conflict_both(y, fin.x, rec[3]),
            recipe=tuple(float(c) for c in rec[0]), rescale=fin.kind, profiles=fin.profiles,
            null_gaps=tuple(float(g) for g in gaps), rejected=tuple(rejected))
    return SparseFit((), (), 0.0, 0.0, (), rejected=tuple(rejected))


def _conflict_both(y: np.ndarray, x: np.ndarray, mask_nz: np.ndarray) -> float | None:
    if x.shape[1] < 2:
        return None
    xn = x[y != 0]
    pos = ((xn > 0) & mask_nz).any(axis=1)
    neg = ((xn < 0) & mask_nz).any(axis=1)
    conflict = (xn > 0).any(axis=1) & (xn < 0).any(axis=1)
    if conflict.sum() < 20:
        return None
    return float((pos & neg)[conflict].mean())


def profile_signatures(fit: SparseFit) -> dict[str, float]:
    """The drop profile as method signatures (``signatures.METHOD_REGISTRY`` reads them)."""
    if not fit.profiles:
        return {}
    ps = fit.profiles
    return {
        "drop_determinism": float(np.mean([p.determinism for p in ps])),
        "drop_slope": float(np.mean([p.slope for p in ps])),
        "drop_random": float(fit.rescale != "none"),
        "drop_graded": float(fit.rescale == "della"),
        # top outliers kept relative to mid-sized entries (Breadcrumbs: ~0, TIES: 1)
        "outlier_keep": float(np.mean([p.top_kept / max(p.mid_kept, 1e-6) for p in ps])),
    }


def recipe_coefficients(fit: SparseFit) -> tuple[float, ...]:
    """The recipe's weight x lambda per parent: fitted with every entry divided by its own
    keep probability (1 for a magnitude cut; DARE: 1 - p; DELLA: p(rank))."""
    return fit.recipe or fit.coefficients


__all__ = [
    "ROUTED_EXACT",
    "DropProfile",
    "SparseFit",
    "fit_sparse",
    "profile_signatures",
    "recipe_coefficients",
    "rescale_kind",
]
