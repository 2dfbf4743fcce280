"""The numba source of ``delta_kernel`` (imported only when the kernel is loaded).

Module-level functions, so numba's on-disk cache finds them again in the next process (a
closure's cache entry is never reused: every process compiled for ~3-10 s).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

# reassociation lets the float64 sums vectorise; no 'nnan'/'ninf': NaN and inf differences
# must count and propagate exactly as in torch
FASTMATH = {"reassoc", "nsz", "contract"}


def _widen_py(src: Any, dst: Any, shift: int) -> None:  # pragma: no cover - compiled
    """Stored bits to float32 bits: bf16 is the high half of a float32 (shift 16)."""
    for j in range(src.shape[0]):
        dst[j] = np.uint32(src[j]) << shift


def _kernel_py(sub: Any, base: Any, shift: int, mode: int, units: Any,
               r0: int) -> tuple[float, int]:  # pragma: no cover - compiled
    """Sum of squares (float64) and non-zero count of ``sub - base`` (as float32), and
    in mode 1 the per-row, in mode 2 the per-column |x|^2, |y|^2, x.y added to ``units``."""
    nr, cols = sub.shape
    xb = np.empty(cols, np.uint32)
    yb = np.empty(cols, np.uint32)
    xf = xb.view(np.float32)
    yf = yb.view(np.float32)
    sq = 0.0
    nz = 0
    c0 = np.zeros(cols if mode == 2 else 1)
    c1 = np.zeros_like(c0)
    c2 = np.zeros_like(c0)
    for i in range(nr):
        _widen(sub[i], xb, shift)
        _widen(base[i], yb, shift)
        s = 0.0
        n = 0
        if mode == 1:
            a = 0.0
            b = 0.0
            c = 0.0
            for j in range(cols):
                x = np.float64(xf[j])
                y = np.float64(yf[j])
                d = np.float64(xf[j] - yf[j])
                s += d * d
                n += d != 0.0
                a += x * x
                b += y * y
                c += x * y
            units[0, r0 + i] += a
            units[1, r0 + i] += b
            units[2, r0 + i] += c
        elif mode == 2:
            for j in range(cols):
                x = np.float64(xf[j])
                y = np.float64(yf[j])
                d = np.float64(xf[j] - yf[j])
                s += d * d
                n += d != 0.0
                c0[j] += x * x
                c1[j] += y * y
                c2[j] += x * y
        else:
            for j in range(cols):
                d = np.float64(xf[j] - yf[j])
                s += d * d
                n += d != 0.0
        sq += s
        nz += n
    if mode == 2:
        for j in range(cols):
            units[0, j] += c0[j]
            units[1, j] += c1[j]
            units[2, j] += c2[j]
    return sq, nz


_widen: Any = None


def build(*, cache: bool) -> Callable[..., tuple[float, int]]:
    """The compiled kernel; ``cache`` keeps the machine code on disk (numba raises when
    it has nowhere to write it, and the caller asks again without)."""
    global _widen
    _widen = njit(nogil=True, cache=cache, fastmath=FASTMATH)(_widen_py)
    return njit(nogil=True, cache=cache, fastmath=FASTMATH)(_kernel_py)  # type: ignore[no-any-return]
