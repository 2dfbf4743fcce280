"""A model's weights read once and held in memory in a compact dtype.

The behavioural checks evaluate the subject at every curve point, merge and scale: reading
it from disk each time multiplies the audit's reads by the number of evaluations.
``ResidentSource`` reads every tensor once (in its stored dtype where the source can hand
it out, bf16 stays bf16) and serves float32 copies, like any ``TensorSource``.
"""

from __future__ import annotations

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

    def _tensor(self, name: str) -> torch.Tensor | None:
        if not self.holding:
            return None
        t = self._held.get(name)
        if t is None:
            t = self._stored(name) if self._stored is not None else self._source.get(name)
            self._held[name] = t
        return t

    def get(self, name: str) -> torch.Tensor:
        t = self._tensor(name)
        return self._source.get(name) if t is None else t.to(torch.float32, copy=True)

    def get_stored(self, name: str) -> torch.Tensor:
        t = self._tensor(name)
        if t is not None:
            return t
        return self._stored(name) if self._stored is not None else self._source.get(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self._tensor(name)
        if t is None:
            return self._source.get_rows(name, start, stop)
        return t[start:stop].to(torch.float32, copy=True)

    def release(self) -> None:
        """Drop the held tensors (the behavioural stage needs the memory)."""
        self.holding = False
        self._held.clear()

    def close(self) -> None:
        self.release()
        self._source.close()
