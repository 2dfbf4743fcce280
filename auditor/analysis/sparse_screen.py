"""The cheap screen that routes a subject to the sparse fit (``sparse_fit``).

A merge's kept coordinates are its parents' values times fixed coefficients, whatever its
zero fraction; a fine-tune (a sibling's included) reproduces almost none. So the share of
the subject's kept coordinates that forward-selected candidates reproduce *exactly*, on the
selection subsample, tells a sparse merge the zero-fraction margin missed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from auditor.analysis.fingerprint import Fingerprint
from auditor.analysis.sparse_fit import _evaluate, _forward, _selection

# A subject with few extra zeros (a TIES / DARE merge of three parents zeroes only where
# all of them were trimmed) is fitted as a sparse merge when forward-selected candidates
# reproduce at least this share of its kept coordinates exactly on the selection
# subsample (a fine-tune reproduces almost none: chance needs every sampled value within
# 1e-3 of a fixed combination).
ROUTE_SCREEN = 0.5


def exact_share(
    subject: Fingerprint,
    candidates: Mapping[str, Fingerprint],
    *,
    keys: Sequence[str],
    order: Sequence[str],
    base: Fingerprint | None = None,
    min_gain: float = 0.02,
) -> float:
    """The share of the subject's nonzero sampled coordinates that the candidates picked
    by forward selection reproduce *exactly* (within ``EXACT_RTOL`` and rounding), on the
    selection subsample: a cheap screen before the full sparse fit. A merge's kept
    coordinates are its parents' values times fixed coefficients, whatever its zero
    fraction; a fine-tune (a sibling's included) reproduces almost none."""
    pool = [n for n in order if n in candidates]
    if not pool:
        return 0.0
    ys, xss, fs = _selection(subject, candidates, pool, keys, base)
    if not (ys != 0).any():
        return 0.0
    chosen = _forward(ys, xss, fs, pool, min_gain)
    if not chosen:
        return 0.0
    return _evaluate(ys, np.stack([xss[c] for c in chosen], axis=1), fs)[2]


def kept_reproduced(
    subject: Fingerprint,
    candidates: Mapping[str, Fingerprint],
    *,
    keys: Sequence[str],
    order: Sequence[str],
    base: Fingerprint | None = None,
) -> bool:
    """Screen for a sparse merge the zero-fraction margin missed: the candidates
    reproduce at least ``ROUTE_SCREEN`` of the subject's kept coordinates exactly."""
    return exact_share(subject, candidates, keys=keys, order=order, base=base) >= ROUTE_SCREEN


__all__ = ["ROUTE_SCREEN", "exact_share", "kept_reproduced"]
