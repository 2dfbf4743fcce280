"""A compiled kernel for the fused task-vector pass: one sweep per chunk of rows.

The torch path of ``delta_print`` spends ~12 torch calls per block: convert both sides to
float32, subtract, count non-zeros, square and sum, and three products and sums for the
disguise screen, each a pass over memory. On a 1B model that is compute, not reading: ~4 s
of a daemon audit against ~1.4 s to read the subject once. Here one numba loop per row
widens the bf16 bits to float32 in a row buffer (exactly what ``.float()`` does: the 16
bits become the high half), then takes the difference, its square in float64, the
non-zero count and the screen's |x|^2, |y|^2, x.y together; measured 3-4x faster, and the
sum of squares is the float64 sum of the float32 differences (no float32 cascade to redo).

The kernel is compiled once per process (numba caches the machine code on disk; a cold
compile is ~3 s, a cached load ~1 s), so ``delta_print`` only uses it for passes large
enough to pay that back. It covers bf16 and float32 storage; other dtypes (fp16, fp8) take
the torch path. ``load()`` returns None when numba is missing or fails to compile, and
the pass falls back to torch: same figures, slower.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# what the screen wants of a chunk: nothing, per-row sums, or per-column sums
MODE_NONE, MODE_ROWS, MODE_COLUMNS = 0, 1, 2

# stored dtype -> (the integer view numba reads, the left shift that makes float32 bits)
_VIEWS: dict[torch.dtype, tuple[torch.dtype, np.dtype[Any], int]] = {
    torch.bfloat16: (torch.int16, np.dtype(np.uint16), 16),
    torch.float32: (torch.int32, np.dtype(np.uint32), 0),
}

# Compute threads at most: past a few, the pass is bound by memory bandwidth and reads.
MAX_WORKERS = 4

_LOCK = threading.Lock()
_KERNEL: Callable[..., tuple[float, int]] | None = None
_TRIED = False


def supported(sub: torch.Tensor, base: torch.Tensor) -> bool:
    """True when both sides are stored in one dtype the kernel reads, as 2-D rows."""
    return (sub.dtype == base.dtype and sub.dtype in _VIEWS and sub.dim() == 2
            and sub.shape == base.shape)


def load() -> Callable[..., tuple[float, int]] | None:
    """The compiled kernel, or None (numba missing or failing: the torch path is used)."""
    global _KERNEL, _TRIED
    with _LOCK:
        if not _TRIED:
            _TRIED = True
            for cache in (True, False):
                # no writable cache folder (a read-only install, no home): compile anew
                try:
                    _KERNEL = _compile(cache=cache)
                    break
                except Exception as exc:  # any failure leaves the exact torch path
                    log.warning("delta kernel (cache=%s) unavailable: %s", cache, exc)
        return _KERNEL


def chunk_stats(kernel: Callable[..., tuple[float, int]], sub: torch.Tensor,
                base: torch.Tensor, *, mode: int, units: np.ndarray | None,
                first_row: int) -> tuple[float, int]:
    """(sum of squares of ``sub - base`` in float64, count of non-zero differences) over
    the rows; with ``mode`` rows or columns, the screen's sums are added into ``units``
    (shape (3, n), float64): rows at ``first_row`` onwards, or every column."""
    view, np_dtype, shift = _VIEWS[sub.dtype]
    s = np.ascontiguousarray(sub.view(view).numpy()).view(np_dtype)
    b = np.ascontiguousarray(base.view(view).numpy()).view(np_dtype)
    out = units if units is not None else np.zeros((3, 1), dtype=np.float64)
    sq, nonzero = kernel(s, b, shift, mode, out, first_row)
    return float(sq), int(nonzero)


def _compile(*, cache: bool) -> Callable[..., tuple[float, int]]:
    # imported here: numba's import (~0.7 s) is paid only by passes that use the kernel
    from auditor.analysis import _delta_numba

    kernel = _delta_numba.build(cache=cache)
    # compile (or load from the cache) both signatures now, under the lock, not on a
    # compute thread in the middle of a pass
    for _, np_dtype, shift in _VIEWS.values():
        probe = np.zeros((1, 2), dtype=np_dtype)
        kernel(probe, probe, shift, MODE_ROWS, np.zeros((3, 2)), 0)
    return kernel


def default_workers() -> int:
    """One compute thread per core this process may run on, at most ``MAX_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


_THREADS_LOCK = threading.Lock()
_threads_users = 0
_threads_saved = 0


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the pass, then restored. The count is
    process-wide: concurrent passes (a daemon's audit threads) share one setting, restored
    when the last of them ends."""
    global _threads_users, _threads_saved
    if n is None:
        yield
        return
    with _THREADS_LOCK:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            if _threads_saved != n:
                torch.set_num_threads(n)
        _threads_users += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _threads_users -= 1
            if _threads_users == 0 and torch.get_num_threads() != _threads_saved:
                torch.set_num_threads(_threads_saved)
