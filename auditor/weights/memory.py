"""In-memory sources: for state dicts the factory or a test holds, and for aligned copies."""

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


class SubtractDeltaSource:
    """Task vector of a model against its base: ``model[name] - base[name]`` over shared names
    of equal shape. Names on one side only or with another shape are left to the caller
    (see ``auditor.weights.task_vectors`` for the full treatment with reports)."""

    def __init__(self, model: object, base: object) -> None:
        from auditor.weights.base import TensorSource

        assert isinstance(model, TensorSource) and isinstance(base, TensorSource)
        self._model = model
        self._base = base
        base_keys = set(base.keys())
        self._keys = [
            k for k in model.keys() if k in base_keys and model.shape(k) == base.shape(k)
        ]

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._model.shape(name)

    def delta(self, name: str) -> torch.Tensor:
        return self._model.get(name) - self._base.get(name)

    def close(self) -> None:
        pass
