"""A model's task-vector fingerprint and its disguise screen in one fused pass.

``compute_fingerprint(model_deltas(...))`` behind a ``ScreenTap`` makes many passes over
every tensor pair in main memory: the subject and the base are each converted to a whole
float32 tensor, the screen takes row norms and dot products over them, the delta is
formed, converted to float64 block by block for its sum of squares, and counted for
zeros. On a 1B model each pass touches ~1.2 G elements, several GB of memory traffic.

Here each pair is read once in its stored dtype (bf16 stays bf16) and walked in row
blocks small enough to stay in cache (``BLOCK_ELEMENTS``): per block the two sides are
converted to float32 into reused buffers, the screen's per-unit sums (|x|^2, |y|^2, x.y)
are accumulated, the delta is formed, and its sum of squares, its count of exact zeros
and the sampled coordinates that fall in the block are taken. Reading overlaps compute:
a reader thread fetches the subject in row chunks and the base one tensor ahead (pread
releases the GIL), and a few compute threads take the chunks (torch releases it too).
``fused_weights_fingerprint`` does the same for a model's own weights (the base's print).
A large pass (``KERNEL_MIN_ELEMENTS``) of bf16 or float32 pairs runs each chunk through one
compiled sweep instead (``delta_kernel``): the same figures, 3-4x less compute.

Results equal the old path's: the samples are the same float32 values of
``subject.float() - base.float()`` (bit for bit), the zero fraction is the same count, the
sum of squares agrees to ~1e-8 relative (float32 cascade sums per block, accumulated in
a Python float; a block whose float32 sum overflowed or underflowed is redone in float64)
and the screen counts are the same (per-unit sums in float64; a unit could only differ if
its cosine or length ratio sat within float rounding of a threshold).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from auditor.analysis import delta_kernel
from auditor.analysis.delta_reader import ChunkReader
from auditor.analysis.disguise_screen import DisguiseScreen, UnitPlan, screen_key
from auditor.analysis.fingerprint import (
    DEFAULT_SAMPLE_SIZE,
    Fingerprint,
    TensorPrint,
    assemble_fingerprint,
    layer_group,
    sample_indices,
)
from auditor.errors import AnalysisError
from auditor.weights.base import TensorSource
from auditor.weights.task_vectors import ModelDeltaSource

# float32 elements per block: four working buffers of 2 MB stay in the L2/L3 caches, and a
# block is large enough that the ~10 torch calls per block cost little Python overhead
# (measured on a 1B model: 128K-element blocks are ~30% slower, 1M no faster).
BLOCK_ELEMENTS = 1 << 19
# Below this, a block's float32 sum of squares may have lost digits to underflow (values
# under ~1e-19): such a block (rare: only near-zero deltas) is summed again in float64.
_TINY_SQ = 1e-20
# float32 sums of 0/1 counts are exact up to 2**24.
_EXACT_COUNT = 1 << 24
# Compared elements from which a pass uses the compiled kernel (``delta_kernel``): loading
# it costs ~1 s per process (~3 s the first time, compiling), which the torch path spends
# on ~300M elements on 2 cores; below, a tiny model's audit would only wait for numba.
KERNEL_MIN_ELEMENTS = 1 << 28


def fused_supported(*sources: object) -> bool:
    """True when every source hands out stored-dtype tensors and row ranges (the
    safetensors reader, ``CachingSource`` over it, ``ResidentSource``)."""
    return all(callable(getattr(s, "get_stored", None))
               and callable(getattr(s, "get_stored_rows", None)) for s in sources)


@dataclass(frozen=True)
class _Job:
    """One compared tensor: the print's name (base namespace) and what to read."""

    name: str
    mname: str | None  # None: a weights print, the base side alone (no subtraction)
    bname: str
    rows: int | None  # shared leading rows of a resized vocabulary; None: whole tensor
    shape: tuple[int, ...]  # the delta's shape
    plan: UnitPlan | None  # the screen's units, None when the screen skips the tensor

    @property
    def nrows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def ncols(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1


def fused_fingerprint(
    deltas: ModelDeltaSource,
    *,
    screen: DisguiseScreen | None = None,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    workers: int | None = None,
    threads: int | None = 1,
    block_elements: int = BLOCK_ELEMENTS,
) -> Fingerprint:
    """The fingerprint ``compute_fingerprint(deltas)`` gives, in one pass per tensor pair;
    ``screen`` (if given) gets the counts ``ScreenTap`` would have fed it.

    ``workers``: compute threads (None: one per core available, at most ``MAX_WORKERS``).
    ``threads``: torch intra-op threads meanwhile (None: leave the setting alone). One is
    the default: each worker's blocks are small, and OpenMP's teams spin at a barrier
    after every op; with 2 threads on 2 busy cores the pass was 10-20x slower.
    """
    if sample_size < 1:
        raise AnalysisError("sample_size must be positive")
    if not fused_supported(deltas.model, deltas.base):
        raise AnalysisError("the fused fingerprint needs sources with stored-dtype reads")
    jobs = [_job(deltas, name, screen) for name in deltas.keys()]
    elements = sum(j.nrows * j.ncols for j in jobs)
    kernel = delta_kernel.load() if elements >= KERNEL_MIN_ELEMENTS else None
    n = workers or delta_kernel.default_workers()
    with delta_kernel.intra_op_threads(threads):
        reader = ChunkReader(deltas.model, deltas.base, jobs, in_flight=2 * n + 1)
        prints = list(_prints(reader, jobs, screen, sample_size, block_elements, n, kernel))
    return assemble_fingerprint(prints, sample_size=sample_size)


def fused_weights_fingerprint(
    source: TensorSource,
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    workers: int | None = None,
    threads: int | None = 1,
    block_elements: int = BLOCK_ELEMENTS,
) -> Fingerprint:
    """The fingerprint ``fingerprint_weights(source)`` gives (the raw weights, a merge
    fit's base term), in one blockwise pass per tensor. Tensors are read whole with
    ``get_stored``: the audit's base is a ``CachingSource`` already holding them."""
    if sample_size < 1:
        raise AnalysisError("sample_size must be positive")
    if not callable(getattr(source, "get_stored", None)):
        raise AnalysisError("the fused fingerprint needs a source with stored-dtype reads")
    jobs = [_Job(name=name, mname=None, bname=name, rows=None,
                 shape=tuple(int(s) for s in source.shape(name)), plan=None)
            for name in source.keys()]
    n = workers or delta_kernel.default_workers()
    with delta_kernel.intra_op_threads(threads):
        reader = ChunkReader(None, source, jobs, in_flight=2 * n + 1)
        prints = list(_prints(reader, jobs, None, sample_size, block_elements, n))
    return assemble_fingerprint(prints, sample_size=sample_size, meta={"kind": "weights"})


def _job(deltas: ModelDeltaSource, name: str, screen: DisguiseScreen | None) -> _Job:
    mname, bname, rows = deltas.pair(name)
    shape = tuple(int(s) for s in deltas.shape(name))
    plan = None
    # ScreenTap observes a pair only when read whole (never a resized vocabulary's rows)
    # and when both names carry the same screened key
    if screen is not None and rows is None and screen_key(bname) is not None \
            and screen_key(mname) == screen_key(bname):
        plan = screen.plan(bname, shape)
    return _Job(name=name, mname=mname, bname=bname, rows=rows, shape=shape, plan=plan)


def _prints(reader: ChunkReader, jobs: list[_Job], screen: DisguiseScreen | None,
            sample_size: int, block_elements: int, workers: int,
            kernel: Callable[..., tuple[float, int]] | None = None,
            ) -> Iterator[TensorPrint]:
    """Chunks from the reader go to ``workers`` compute threads (torch releases the GIL
    in its kernels, so they run in parallel with no OpenMP barrier to wait at on busy
    cores); their results are merged here in row order, so the figures do not depend on
    which thread finished first."""
    width = max([block_elements, *(j.ncols for j in jobs)])
    local = threading.local()

    def buffers() -> list[torch.Tensor]:
        # per thread, reused: subject, base, delta, scratch (a fresh buffer per block
        # would be page-faulted again under the audit's 1 MB mmap threshold)
        bufs: list[torch.Tensor] | None = getattr(local, "bufs", None)
        if bufs is None:
            bufs = local.bufs = [torch.empty(width, dtype=torch.float32) for _ in range(4)]
        return bufs

    pool = ThreadPoolExecutor(workers, thread_name_prefix="delta-print")
    inflight: deque[_InFlight] = deque()
    done = 0
    try:
        acc: _Accumulator | None = None
        for index, start, sub, base, buf in reader.items():
            job = jobs[index]
            if acc is None or acc.job is not job:
                acc = _Accumulator(job, sample_size, kernel)
            block_rows = max(1, block_elements // max(1, job.ncols))
            future = pool.submit(_run_chunk, acc, start, sub, base, buffers, block_rows)
            inflight.append((acc, future, start + sub.shape[0] >= job.nrows, buf))
            # bounded: at most two chunks per worker held beyond the reader's queue (the
            # reader's buffer pool counts on it)
            while inflight and (len(inflight) > 2 * workers or inflight[0][1].done()):
                if (tp := _settle(inflight, screen, reader)) is not None:
                    done += 1
                    yield tp
        while inflight:
            if (tp := _settle(inflight, screen, reader)) is not None:
                done += 1
                yield tp
        if done != len(jobs):
            raise AnalysisError(f"read {done} of {len(jobs)} tensors")
    finally:
        reader.close()
        pool.shutdown(wait=True, cancel_futures=True)


# a submitted chunk: its tensor's accumulator, its result, whether it is the tensor's last,
# and the reader's buffer its rows are in
_InFlight = tuple["_Accumulator", Future["_Part"], bool, torch.Tensor | None]


def _run_chunk(acc: _Accumulator, start: int, sub: torch.Tensor, base: torch.Tensor | None,
               buffers: Callable[[], list[torch.Tensor]], block_rows: int) -> _Part:
    return acc.chunk(start, sub, base, buffers(), block_rows)


def _settle(inflight: deque[_InFlight], screen: DisguiseScreen | None,
            reader: ChunkReader) -> TensorPrint | None:
    """Merge the oldest chunk (its buffer back to the reader); the tensor's print once its
    last chunk is in."""
    acc, future, last, buf = inflight.popleft()
    acc.merge(future.result())
    reader.recycle(buf)
    return acc.finish(screen) if last else None


@dataclass
class _Part:
    """What one chunk adds to its tensor's figures."""

    sq: float = 0.0
    nonzero: int = 0
    sampled: int = 0
    columns: list[torch.Tensor] | None = None  # partial |x|^2, |y|^2, x.y per column


class _Accumulator:
    """Statistics of one tensor pair. ``chunk`` runs on a compute thread and writes only
    its own rows' slots (samples, per-row sums); what adds up across chunks comes back
    in a ``_Part`` for ``merge``, called in row order on one thread."""

    def __init__(self, job: _Job, sample_size: int,
                 kernel: Callable[..., tuple[float, int]] | None = None) -> None:
        self.job = job
        self.kernel = kernel
        self.sq = 0.0
        self.nonzero = 0
        self.sampled = 0
        self.idx_np = sample_indices(job.name, job.shape, sample_size)
        self.idx = torch.from_numpy(self.idx_np)
        self.sample = torch.empty(self.idx_np.shape[0], dtype=torch.float32)
        plan = job.plan
        self.units: list[torch.Tensor] = []  # |x|^2, |y|^2, x.y per row or per column
        self.rows_units: np.ndarray | None = None  # the kernel's per-row sums, float64
        if plan is not None:
            # a row is whole in a block: its float32 sum is final; a column gathers a
            # partial sum from every block, accumulated in float64 (the kernel sums
            # both in float64)
            n, dtype = (job.ncols, torch.float64) if plan.columns else (job.nrows, torch.float32)
            if kernel is not None and not plan.columns:
                dtype = torch.float64
            units = torch.zeros(3, n, dtype=dtype)
            self.units = list(units.unbind(0))
            if dtype == torch.float64 and not plan.columns:
                self.rows_units = units.numpy()

    def chunk(self, start: int, sub: torch.Tensor, base: torch.Tensor | None,
              bufs: list[torch.Tensor], block_rows: int) -> _Part:
        if self.kernel is not None and base is not None and delta_kernel.supported(sub, base):
            return self._kernel_chunk(start, sub, base)
        part = _Part()
        colsum = None
        if self.job.plan is not None and self.job.plan.columns:
            part.columns = [torch.zeros(self.job.ncols, dtype=torch.float64) for _ in range(3)]
            colsum = torch.empty(self.job.ncols, dtype=torch.float32)
        for r0 in range(0, sub.shape[0], block_rows):
            self._block(part, start + r0, sub[r0:r0 + block_rows],
                        None if base is None else base[r0:r0 + block_rows], bufs, colsum)
        return part

    def _kernel_chunk(self, start: int, sub: torch.Tensor, base: torch.Tensor) -> _Part:
        """The chunk in one compiled sweep (``delta_kernel``); samples taken apart, as the
        same float32 differences."""
        assert self.kernel is not None
        part = _Part()
        plan = self.job.plan
        units: np.ndarray | None = None
        mode = delta_kernel.MODE_NONE
        if plan is not None and plan.columns:
            mode = delta_kernel.MODE_COLUMNS
            cols = torch.zeros(3, self.job.ncols, dtype=torch.float64)
            part.columns = list(cols.unbind(0))
            units = cols.numpy()
        elif plan is not None:
            mode, units = delta_kernel.MODE_ROWS, self.rows_units
        part.sq, part.nonzero = delta_kernel.chunk_stats(
            self.kernel, sub, base, mode=mode, units=units, first_row=start)
        cols_n = self.job.ncols
        lo, hi = np.searchsorted(self.idx_np, (start * cols_n, (start + sub.shape[0]) * cols_n),
                                 side="left")
        if hi > lo:
            at = self.idx[lo:hi] - start * cols_n
            self.sample[lo:hi] = sub.reshape(-1)[at].float() - base.reshape(-1)[at].float()
            part.sampled = int(hi - lo)
        return part

    def _block(self, part: _Part, r0: int, sub: torch.Tensor, base: torch.Tensor | None,
               bufs: list[torch.Tensor], colsum: torch.Tensor | None) -> None:
        nr, cols = sub.shape
        m = nr * cols
        x, y, d, t = (b[:m].view(nr, cols) for b in bufs)
        x.copy_(sub)  # the stored dtype converted exactly as ``.float()`` does
        if base is None:  # a weights print: the values themselves
            d = x
        else:
            y.copy_(base)
            torch.sub(x, y, out=d)
        count_dtype = torch.float32 if m < _EXACT_COUNT else torch.float64
        nonzero = int(torch.ne(d, 0, out=t).sum(dtype=count_dtype))
        part.nonzero += nonzero
        sq = float(torch.mul(d, d, out=t).sum())
        if not (_TINY_SQ <= sq < math.inf) and (nonzero or not math.isfinite(sq)):
            # float32 squares overflowed (|d| > 1.8e19), underflowed, or hit NaN / inf:
            # float64 gives the old path's figure (finite iff every value is)
            flat = d.reshape(-1).to(torch.float64)
            sq = float(torch.dot(flat, flat))
        part.sq += sq
        # the sampled coordinates in this block (indices are sorted)
        lo, hi = np.searchsorted(self.idx_np, (r0 * cols, r0 * cols + m), side="left")
        if hi > lo:
            self.sample[lo:hi] = d.reshape(-1)[self.idx[lo:hi] - r0 * cols]
            part.sampled += int(hi - lo)
        if not self.units:
            return
        for k, (a, b) in enumerate(((x, x), (y, y), (x, y))):
            torch.mul(a, b, out=t)
            if part.columns is not None and colsum is not None:
                part.columns[k].add_(torch.sum(t, 0, out=colsum))
            else:
                torch.sum(t, 1, out=self.units[k][r0:r0 + nr])

    def merge(self, part: _Part) -> None:
        self.sq += part.sq
        self.nonzero += part.nonzero
        self.sampled += part.sampled
        if part.columns is not None:
            for total, add in zip(self.units, part.columns, strict=True):
                total.add_(add)

    def finish(self, screen: DisguiseScreen | None) -> TensorPrint:
        job = self.job
        if screen is not None and job.plan is not None:
            xx, yy, xy = (u.to(torch.float64) for u in self.units)
            if job.plan.heads:
                xx, yy, xy = (u.view(job.plan.heads, -1).sum(1) for u in (xx, yy, xy))
            screen.tally(job.plan.layer, xx.sqrt(), yy.sqrt(), xy, signed=job.plan.signed)
        numel = math.prod(job.shape) if job.shape else 1
        if self.sampled != self.sample.shape[0]:
            raise AnalysisError(f"{job.name}: {self.sampled} of {self.sample.shape[0]} "
                                "sampled coordinates read")
        return TensorPrint(
            name=job.name,
            shape=job.shape,
            numel=numel,
            sq_norm=self.sq,
            zero_fraction=float(numel - self.nonzero) / max(1, numel),
            group=layer_group(job.name),
            sample=self.sample.numpy(),
        )
