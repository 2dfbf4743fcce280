"""A model's weights read once and held in memory in a compact dtype.

The behavioural checks evaluate the subject at every curve point, merge and scale: reading
it from disk each time multiplies the audit's reads by the number of evaluations.
``ResidentSource`` reads every tensor once (in its stored dtype where the source can hand
it out, bf16 stays bf16) and serves float32 copies, like any ``TensorSource``.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from auditor.weights.base import TensorSource


class ResidentSource:
    """``TensorSource`` over ``source``'s tensors, read once, held in ``dtype``.

    ``dtype`` None keeps each tensor's stored dtype (float32 for computed sources such as
    an adapter's base + delta); a floating ``dtype`` stores every floating tensor in it.
    """

    def __init__(self, source: TensorSource, *, dtype: torch.dtype | None = None) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        stored = getattr(source, "get_stored", None)
        for name in source.keys():
            t = stored(name) if stored is not None else source.get(name)
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            self._tensors[name] = t
        self._keys = sorted(self._tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].to(torch.float32, copy=True)

    def get_stored(self, name: str) -> torch.Tensor:
        """The held tensor itself (read-only by convention: callers must not modify it)."""
        return self._tensors[name]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name][start:stop].to(torch.float32, copy=True)

    def get_stored_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """A view of the held rows (read-only by convention)."""
        return self._tensors[name][start:stop]

    def close(self) -> None:
        self._tensors.clear()


class CachingSource:
    """``TensorSource`` that keeps each tensor of ``source`` (stored dtype) after its first
    read, until ``release()``: the base of an audit is read by every model's task vector,
    once from disk this way. After ``release()`` reads go to ``source`` again."""

    def __init__(self, source: TensorSource) -> None:
        self._source = source
        self._held: dict[str, torch.Tensor] = {}
        self._stored = getattr(source, "get_stored", None)
        self.holding = True

    def __getattr__(self, attr: str) -> object:
        # headers, dtype(), info() ... of the underlying reader
        return getattr(self._source, attr)

    def keys(self) -> list[str]:
        return self._source.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._source.shape(name)

    # Reads that reach ``source`` happen under this; a plain one is no lock (one audit's
    # thread), ``SharedBase`` sets a real one.
    _lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()

    def _tensor(self, name: str) -> torch.Tensor | None:
        t = self._held.get(name) if self.holding else None
        if t is not None or not self.holding:
            return t
        with self._lock:
            t = self._held.get(name) if self.holding else None
            if t is None and self.holding:
                t = self._read_stored(name)
                self._held[name] = t
            return t

    def _read_stored(self, name: str) -> torch.Tensor:
        return self._stored(name) if self._stored is not None else self._source.get(name)

    def get(self, name: str) -> torch.Tensor:
        t = self._tensor(name)
        if t is not None:
            return t.to(torch.float32, copy=True)
        with self._lock:
            return self._source.get(name)

    def get_stored(self, name: str) -> torch.Tensor:
        t = self._tensor(name)
        if t is not None:
            return t
        with self._lock:
            return self._read_stored(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self._tensor(name)
        if t is not None:
            return t[start:stop].to(torch.float32, copy=True)
        with self._lock:
            return self._source.get_rows(name, start, stop)

    def release(self) -> None:
        """Drop the held tensors (the behavioural stage needs the memory)."""
        self.holding = False
        self._held.clear()

    def close(self) -> None:
        self.release()
        self._source.close()


class SharedBase(CachingSource):
    """A ``CachingSource`` that audits of one process share (a daemon worker's threads):
    the underlying reader keeps one shard open and is not safe from two threads, so every
    read that may reach it happens under a lock; a held tensor is handed out without one."""

    def __init__(self, source: TensorSource) -> None:
        super().__init__(source)
        self._lock = threading.Lock()  # the held tensors are read without it
        self.leases = 0
        self.evicted = False

    @property
    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self._held.values()))


class BaseLease:
    """One audit's use of a ``SharedBase``: reads go to it; ``release()`` (the behavioural
    stage wants the memory) evicts it from the process's cache; ``close()`` ends the use
    (the cache then trims itself to its budget)."""

    def __init__(self, shared: SharedBase, cache: SharedBases) -> None:
        self._source = shared  # ``_source``: delta_print's ``_root`` finds the reader below
        self._cache = cache
        self._closed = False

    def __getattr__(self, attr: str) -> object:
        return getattr(self._source, attr)

    def keys(self) -> list[str]:
        return self._source.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._source.shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self._source.get(name)

    def get_stored(self, name: str) -> torch.Tensor:
        return self._source.get_stored(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._source.get_rows(name, start, stop)

    def release(self) -> None:
        self._cache.evict(self._source)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cache.end_lease(self._source)


# Bases held at most, whatever their size: each keeps a file open, and a worker watches a
# few base families at a time (a test session opens hundreds of tiny ones).
MAX_SHARED_BASES = 8


class SharedBases:
    """Bases held in memory across the audits of one process, least recently used first
    out, within ``budget`` bytes once no audit uses them. A daemon worker audits a base's
    derivatives one after another: with the base held, an audit reads only its subject
    (the 1B first pass: 8 s with the base read from disk, the subject's read alone 1.5 s).

    A key names the content *and* the files it is read from (a folder deleted and
    rebuilt at another path is another entry): the lazily read tensors come from there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, SharedBase] = OrderedDict()
        self._budget = 0

    def lease(self, key: Hashable, open_source: Callable[[], TensorSource], *,
              budget: int) -> BaseLease:
        with self._lock:
            shared = self._entries.get(key) if budget > 0 else None
            if shared is None:
                shared = SharedBase(open_source())
                if budget > 0:
                    self._entries[key] = shared
                else:  # not shared: evicted at once, freed when its audit ends
                    shared.evicted = True
            else:
                self._entries.move_to_end(key)
            shared.leases += 1
            self._budget = budget
            return BaseLease(shared, self)

    def evict(self, shared: SharedBase) -> None:
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry is shared:
                    del self._entries[key]
            shared.evicted = True
        shared.release()  # its tensors go now; reads fall back to the files

    def end_lease(self, shared: SharedBase) -> None:
        with self._lock:
            shared.leases -= 1
            done = [shared] if shared.evicted and shared.leases == 0 else []
            total = sum(e.held_bytes for e in self._entries.values())
            count = len(self._entries)
            for key, entry in list(self._entries.items()):  # oldest first
                if total <= self._budget and count <= MAX_SHARED_BASES:
                    break
                if entry.leases == 0:
                    total -= entry.held_bytes
                    count -= 1
                    del self._entries[key]
                    done.append(entry)
        for entry in done:
            entry.close()

    def clear(self) -> None:
        """Drop every base no audit uses (tests; a worker told to free memory)."""
        with self._lock:
            idle = [(k, e) for k, e in self._entries.items() if e.leases == 0]
            for key, _ in idle:
                del self._entries[key]
        for _, entry in idle:
            entry.close()

    def __len__(self) -> int:
        return len(self._entries)


SHARED_BASES = SharedBases()
