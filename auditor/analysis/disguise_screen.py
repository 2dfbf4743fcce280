"""A cheap test, linear in the parameters, of whether a model is disguised against its base.

Function-preserving disguises (PaRaMS, MergeLock, head rescaling) move every unit of a
layer away from the base unit *at the same index*: a permuted MLP neuron's gate row points
somewhere else, a rescaled neuron's up row changes length, a head mixed by an invertible
map changes direction or length. An honest fine-tune keeps each unit near its base unit.
So per unit we compare the subject with the base at the same index only (one dot product
and two norms per row: O(parameters), no n x n similarity) and call a layer suspect when a
clear share of its units moved. Only a suspect model is aligned (``auditor.analysis.align``).

The screen is fed by ``ScreenTap``: it wraps the subject's and the base's ``TensorSource``
during the task-vector pass, so the screen reads no byte that pass does not read anyway.

Thresholds are about geometry, not any zoo: a unit "stays" when its cosine with the base
unit is above ``STAY_COSINE`` (a random direction in d dimensions has cosine ~ 1/sqrt(d);
fine-tunes keep cosines near 1) and its length ratio is within ``SCALE_TOLERANCE`` in log
space; a layer is suspect when more than ``SUSPECT_SHARE`` of its units moved.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from auditor.weights.base import TensorSource

STAY_COSINE = 0.5
SCALE_TOLERANCE = math.log(1.25)
SUSPECT_SHARE = 0.2

_MLP_RE = re.compile(r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
_ATTN_RE = re.compile(r"layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight$")


@dataclass(frozen=True)
class UnitPlan:
    """How the screen reads one 2-D tensor: its units are its rows (``columns`` False) or
    its columns, each one a unit or, with ``heads``, grouped into that many equal runs."""

    layer: str
    signed: bool  # gate rows: a sign flip is a move (SiLU is not odd)
    columns: bool
    heads: int | None


@dataclass
class LayerScreen:
    units: int = 0
    moved: int = 0  # units whose direction left the base unit at the same index
    rescaled: int = 0  # units whose length changed clearly


@dataclass
class DisguiseScreen:
    """Per-layer counts of moved / rescaled units and the verdict."""

    layers: dict[str, LayerScreen] = field(default_factory=dict)
    num_heads: int | None = None
    num_kv_heads: int | None = None

    @property
    def suspect_layers(self) -> list[str]:
        return sorted(
            name for name, la in self.layers.items()
            if la.units and (la.moved + la.rescaled) / la.units > SUSPECT_SHARE
        )

    @property
    def suspect(self) -> bool:
        return bool(self.suspect_layers)

    @property
    def moved_share(self) -> float:
        units = sum(la.units for la in self.layers.values())
        return sum(la.moved for la in self.layers.values()) / units if units else 0.0

    def observe(self, name: str, sub: torch.Tensor, base: torch.Tensor) -> None:
        """Compare one tensor of the subject with the base's (same name and shape)."""
        if sub.shape != base.shape or sub.dim() != 2:
            return
        m = _MLP_RE.search(name)
        if m:
            # gate rows are never rescaled by a function-preserving disguise (SiLU);
            # up rows and down columns may be, in either sign
            # down's units are its columns: reduced along dim 0, never transposed (a
            # strided row reduction is several times slower)
            self._count(f"layer.{m.group(1)}.mlp", sub, base, signed=m.group(2) == "gate",
                        dim=0 if m.group(2) == "down" else 1)
            return
        a = _ATTN_RE.search(name)
        if a and self.num_heads:
            kind = a.group(2)
            kv = self.num_kv_heads or self.num_heads
            heads = self.num_heads if kind in ("q", "o") else kv
            x, y = (sub.T, base.T) if kind == "o" else (sub, base)
            if x.shape[0] % heads:
                return
            self._count(f"layer.{a.group(1)}.attn", x.reshape(heads, -1),
                        y.reshape(heads, -1), signed=False)

    def plan(self, name: str, shape: tuple[int, ...]) -> UnitPlan | None:
        """Which units ``observe`` would compare in the tensor ``name`` of this 2-D ``shape``
        (None: it compares none): the same routing, for a caller that streams a tensor in
        row blocks and accumulates per-unit sums (``auditor.analysis.delta_print``). Keep in
        step with ``observe``: tests/test_delta_print.py checks both give the same counts."""
        if len(shape) != 2:
            return None
        m = _MLP_RE.search(name)
        if m:
            return UnitPlan(f"layer.{m.group(1)}.mlp", signed=m.group(2) == "gate",
                            columns=m.group(2) == "down", heads=None)
        a = _ATTN_RE.search(name)
        if a and self.num_heads:
            kind = a.group(2)
            kv = self.num_kv_heads or self.num_heads
            heads = self.num_heads if kind in ("q", "o") else kv
            # o_proj's heads are groups of its columns (``observe`` transposes it)
            if shape[1 if kind == "o" else 0] % heads:
                return None
            return UnitPlan(f"layer.{a.group(1)}.attn", signed=False, columns=kind == "o",
                            heads=heads)
        return None

    def _count(self, layer: str, x: torch.Tensor, y: torch.Tensor, *, signed: bool,
               dim: int = 1) -> None:
        """Units are the rows of x and y (``dim`` 1) or their columns (``dim`` 0)."""
        x, y = x.float(), y.float()
        nx, ny = x.norm(dim=dim), y.norm(dim=dim)
        self.tally(layer, nx, ny, torch.linalg.vecdot(x, y, dim=dim), signed=signed)

    def tally(self, layer: str, nx: torch.Tensor, ny: torch.Tensor, dot: torch.Tensor, *,
              signed: bool) -> None:
        """Count the units of ``layer`` from their norms (subject, base) and dot products."""
        cos = dot / (nx * ny).clamp_min(1e-30)
        if not signed:
            cos = cos.abs()
        ok = (nx > 0) & (ny > 0)
        moved = (cos < STAY_COSINE) & ok
        log_ratio = (nx.clamp_min(1e-30) / ny.clamp_min(1e-30)).log().abs()
        rescaled = (log_ratio > SCALE_TOLERANCE) & ok & ~moved
        la = self.layers.setdefault(layer, LayerScreen())
        la.units += int(ok.sum())
        la.moved += int(moved.sum())
        la.rescaled += int(rescaled.sum())

    def summary(self) -> dict[str, Any]:
        return {"suspect": self.suspect, "suspect_layers": self.suspect_layers,
                "moved_share": round(self.moved_share, 4)}


class _Tap:
    """A pass-through ``TensorSource`` that hands each tensor it serves to the screen."""

    def __init__(self, inner: TensorSource, pair: ScreenTap, role: str) -> None:
        self._inner = inner
        self._pair = pair
        self._role = role

    def keys(self) -> list[str]:
        return self._inner.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._inner.shape(name)

    def get(self, name: str) -> torch.Tensor:
        t = self._inner.get(name)
        self._pair.seen(self._role, name, t)
        return t

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._inner.get_rows(name, start, stop)

    def info(self, name: str) -> Any:
        return self._inner.info(name)  # type: ignore[attr-defined]

    def dtype(self, name: str) -> Any:
        return self._inner.dtype(name)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._inner.close()


class ScreenTap:
    """Wrap a subject and a base source; every tensor read of both feeds ``screen``.

    The task-vector pass reads the subject's tensor, then the base's, then subtracts in
    place; the screen looks at the pair when the second arrives, before that subtraction.
    Holds at most one subject tensor between the two reads.
    """

    def __init__(self, subject: TensorSource, base: TensorSource, *,
                 config: Mapping[str, Any] | None = None) -> None:
        self.screen = new_screen(config)
        self.subject: TensorSource = _Tap(subject, self, "s")  # type: ignore[assignment]
        self.base: TensorSource = _Tap(base, self, "b")  # type: ignore[assignment]
        self._pending: tuple[str, torch.Tensor] | None = None

    def seen(self, role: str, name: str, t: torch.Tensor) -> None:
        key = screen_key(name)
        if key is None:
            return
        if role == "s":
            # no copy: the caller subtracts in place only after the base tensor arrives
            self._pending = (key, t)
        elif self._pending is not None and self._pending[0] == key:
            self.screen.observe(name, self._pending[1], t)
            self._pending = None


def new_screen(config: Mapping[str, Any] | None) -> DisguiseScreen:
    """An empty screen with the head counts of ``config`` (attention is screened only when
    ``num_attention_heads`` is known)."""
    heads = _int((config or {}).get("num_attention_heads"))
    kv = _int((config or {}).get("num_key_value_heads")) or heads
    return DisguiseScreen(num_heads=heads, num_kv_heads=kv)


def screen_key(name: str) -> str | None:
    """The part of a tensor name the screen pairs on (None: not screened): it survives
    prefix differences between the subject's and the base's files ("model." or not)."""
    m = _MLP_RE.search(name) or _ATTN_RE.search(name)
    return None if m is None else m.group(0)


def screen_sources(subject: TensorSource, base: TensorSource, *,
                   config: Mapping[str, Any] | None = None) -> DisguiseScreen:
    """The screen from a direct pass (reads the MLP and attention tensors of both)."""
    tap = ScreenTap(subject, base, config=config)
    base_names = set(base.keys())
    for name in subject.keys():
        if (_MLP_RE.search(name) or _ATTN_RE.search(name)) and name in base_names:
            tap.screen.observe(name, subject.get(name), base.get(name))
    return tap.screen


def _int(v: object) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
