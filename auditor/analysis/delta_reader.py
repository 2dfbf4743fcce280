"""The fused pass's reader (``delta_print``): each compared pair's base tensor whole and
its subject in row chunks, on threads of their own, so reading overlaps compute.

A subject read from safetensors (``read_rows_into``) is read into a small pool of reused
buffers, returned by the caller once a chunk's compute is done (``recycle``). A fresh
buffer per read page-faults all of its pages again: with 512 KB reads (below the
allocator's mmap threshold, so from the heap) a 1B model is ~4,700 chunks, and the
per-chunk work (a thread hand-off, the sampled coordinates, the screen's sums) cost more
than the kernel itself (1B, 2 cores: 2.4 s a pass; 4 MB pooled reads: ~1.2 s).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

__all__ = ["POOLED_CHUNK_BYTES", "PREFETCH_CHUNKS", "READ_CHUNK_BYTES", "ChunkReader", "Item"]

# Bytes of subject rows per read into a fresh tensor (a source without ``read_rows_into``).
# Below the allocator's mmap threshold (1 MB under ``bound_host_allocator``; glibc's own
# grows past it), so every chunk's buffer comes from the heap, reused when the last one
# is freed: a fresh mapping per read page-faults every 4 KB (16 MB reads of a 1B model:
# 600k faults, 2.7 s CPU for the pass; 512 KB: ~50k faults, 1.95 s). Small reads also
# keep memory bounded whatever the tensor (a 128k-row embedding is 0.5 GB in bf16).
READ_CHUNK_BYTES = 512 << 10
# Bytes per read into a pooled buffer: faulted once, so larger reads cost no faults and
# ~8x fewer chunks (the pool is PREFETCH_CHUNKS + 2 per worker + 2 of these: ~90 MB).
POOLED_CHUNK_BYTES = 4 << 20
# Chunks the reader may run ahead of compute (while the base thread reads a large tensor).
PREFETCH_CHUNKS = 16


class ReadJob(Protocol):
    """What the reader needs of one compared tensor (``delta_print._Job``)."""

    @property
    def mname(self) -> str | None: ...  # None: a weights print, the base side alone

    @property
    def bname(self) -> str: ...

    @property
    def rows(self) -> int | None: ...  # shared leading rows of a resized vocabulary

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def nrows(self) -> int: ...

    @property
    def ncols(self) -> int: ...


# job index, first row, subject rows, base rows (weights print: the rows, None), and the
# pooled buffer the subject rows are a view of (None: not pooled), for ``recycle``
Item = tuple[int, int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class _Pool:
    """At most ``limit`` byte buffers of ``size``, made on demand and handed back."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self._limit = limit
        self._made = 0
        self._free: list[torch.Tensor] = []
        self._cond = threading.Condition()

    def take(self, stop: threading.Event) -> torch.Tensor | None:
        with self._cond:
            while not self._free and self._made >= self._limit:
                if stop.is_set():
                    return None
                self._cond.wait(0.1)
            if self._free:
                return self._free.pop()
            self._made += 1
        return torch.empty(self.size, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()


class ChunkReader:
    """Reads every job's pair on a thread of its own, in order: the base tensor whole
    (``get_stored``: a ``CachingSource`` keeps it for the next model) one job ahead on a
    second thread, the subject in row chunks (``read_rows_into`` a pooled buffer, else
    ``get_stored_rows``). Both read with pread, which releases the GIL.

    ``in_flight``: chunks the caller may hold beyond the queue (its compute threads' and
    the one it is handing out); the pool is sized so the reader never waits on a buffer
    the caller could only return after the reader's next chunk.
    """

    def __init__(self, model: object | None, base: object, jobs: list[Any], *,
                 in_flight: int) -> None:
        self._model: Any = model
        self._base: Any = base
        self._jobs: list[ReadJob] = jobs
        # one reader object is not safe to read from two threads (it keeps one shard open):
        # a model compared with itself reads its base side in turn
        self._parallel = _root(self._model) is not _root(self._base)
        self._into = getattr(model, "read_rows_into", None)
        self._pool = _Pool(POOLED_CHUNK_BYTES, PREFETCH_CHUNKS + in_flight + 2) \
            if callable(self._into) else None
        self._queue: queue.Queue[Item | BaseException | None] = queue.Queue(PREFETCH_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delta-print-reader",
                                        daemon=True)
        self._thread.start()

    def items(self) -> Iterator[Item]:
        """The chunks in order; the reader's exception, if any, raised here."""
        while (item := self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def recycle(self, buf: torch.Tensor | None) -> None:
        """A chunk's buffer back to the pool: nothing reads its rows any more."""
        if buf is not None and self._pool is not None:
            self._pool.give(buf)

    def close(self) -> None:
        self._stop.set()
        # unblock a reader waiting on a full queue, then let it finish its current read
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join()

    def _put(self, item: Item | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="delta-print-base") as pool:
                ahead: Future[torch.Tensor] | None = None
                for index, job in enumerate(self._jobs):
                    if ahead is None:
                        ahead = pool.submit(self._read_base, job)
                    base = ahead.result()
                    ahead = None
                    if self._parallel and index + 1 < len(self._jobs) \
                            and not self._stop.is_set():
                        ahead = pool.submit(self._read_base, self._jobs[index + 1])
                    if not self._read_subject(index, job, base):
                        break
            self._put(None)
        except BaseException as exc:  # handed to the caller, raised there
            self._put(exc)

    def _read_base(self, job: ReadJob) -> torch.Tensor:
        t = self._base.get_stored(job.bname)
        if job.rows is not None:
            t = t[:job.rows]
        return t.reshape(job.nrows, job.ncols)

    def _read_subject(self, index: int, job: ReadJob, base: torch.Tensor) -> bool:
        if job.mname is None:  # a weights print: the base's tensor, in chunks
            return all(self._put((index, start, base[start:start + rows], None, None))
                       for start, rows in _chunks(job, base, READ_CHUNK_BYTES))
        if not job.shape:  # a scalar has no rows
            sub = self._model.get_stored(job.mname).reshape(1, 1)
            return self._put((index, 0, sub, base, None))
        pool = self._pool
        for start, rows in _chunks(job, base, READ_CHUNK_BYTES if pool is None else pool.size):
            buf = None
            if pool is not None:
                if (buf := pool.take(self._stop)) is None:
                    return False
                # rows larger than the buffer (one huge row, or a subject stored wider
                # than its base) come in a fresh tensor
                sub = self._into(job.mname, start, start + rows, buf)
            else:
                sub = self._model.get_stored_rows(job.mname, start, start + rows)
            if not self._put((index, start, sub.reshape(rows, job.ncols),
                              base[start:start + rows], buf)):
                return False
        return True


def _chunks(job: ReadJob, base: torch.Tensor, size: int) -> Iterator[tuple[int, int]]:
    """(first row, rows) of each read of ``job``: at least one, even for no rows."""
    # the base's item size stands for the subject's (a read's size is only a tuning)
    rows = max(1, size // max(1, job.ncols * base.element_size()))
    start = 0
    while True:
        yield start, min(rows, job.nrows - start)
        start += rows
        if start >= job.nrows:
            return


def _root(source: object) -> object:
    """The reader under a caching wrapper (``CachingSource`` keeps it as ``_source``)."""
    while (inner := getattr(source, "_source", None)) is not None:
        source = inner
    return source
