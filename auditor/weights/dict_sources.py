"""Tensor sources over in-memory dicts: state dicts the test kit or a test holds, aligned copies."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class DictTensorSource:
    """A ``TensorSource`` over a mapping of name -> tensor (kept as given, served as float32)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach().to(torch.float32).clone()

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[name][start:stop].detach().to(torch.float32).clone()

    def close(self) -> None:
        self._tensors.clear()


class DictDeltaSource:
    """A ``DeltaSource`` over a mapping of name -> task-vector tensor."""

    def __init__(self, deltas: Mapping[str, torch.Tensor]) -> None:
        self._deltas = dict(deltas)

    def keys(self) -> list[str]:
        return sorted(self._deltas)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._deltas[name].shape)

    def delta(self, name: str) -> torch.Tensor:
        return self._deltas[name].detach().to(torch.float32).clone()

    def close(self) -> None:
        self._deltas.clear()
