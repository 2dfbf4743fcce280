"""An adapter (PEFT LoRA / DoRA) seen as full weights: base + its reconstructed delta.

Behavioural checks and barrier curves need runnable weights; an adapter repo has none of
its own. ``AdapterWeights`` serves ``base[name] + delta[name]`` one tensor at a time, so
an adapter is a full homologue everywhere (no merged copy is ever written or held).
"""

from __future__ import annotations

import torch

from auditor.weights.base import DeltaSource, TensorSource


class AdapterWeights:
    """``TensorSource`` of base + adapter delta (names in the base's namespace)."""

    def __init__(self, base: TensorSource, deltas: DeltaSource) -> None:
        self._base = base
        self._deltas = deltas
        self._delta_names = set(deltas.keys())

    def keys(self) -> list[str]:
        return self._base.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._base.shape(name)

    def get(self, name: str) -> torch.Tensor:
        t = self._base.get(name)
        if name in self._delta_names:
            t.add_(self._deltas.delta(name).to(t.dtype))
        return t

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self._base.get_rows(name, start, stop)
        if name in self._delta_names:
            t.add_(self._deltas.delta(name)[start:stop].to(t.dtype))
        return t

    def close(self) -> None:
        # the base belongs to the audit (closed there); the adapter's own file is ours
        self._deltas.close()
