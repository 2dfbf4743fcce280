"""Task vectors of a full model against its base, one tensor at a time.

Each delta is computed when asked for and handed over; nothing is cached, so peak memory is
two float32 tensors (model and base copy of one name) whatever the model size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from auditor.errors import ShapeMismatch
from auditor.weights.base import TensorSource
from auditor.weights.names import EMBED_SUFFIXES, HEAD_SUFFIXES, NameAlignment, align_names


@dataclass(frozen=True)
class TaskVectorReport:
    """What could and could not be compared (names in the base's namespace)."""

    compared: tuple[str, ...]
    only_model: tuple[str, ...]  # e.g. a new classification head
    only_base: tuple[str, ...]
    resized: Mapping[str, tuple[int, int]]  # name -> (base_rows, model_rows); shared rows compared
    tied: tuple[str, ...]
    skipped: Mapping[str, str]  # name -> reason (shape mismatch, unsupported dtype)
    name_mapping: str = "identity"
    added_rows: Mapping[str, int] = field(default_factory=dict)  # model_rows - base_rows if > 0


def _is_vocab_tensor(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in EMBED_SUFFIXES + HEAD_SUFFIXES)


def _arithmetic(source: TensorSource, name: str) -> bool:
    info = getattr(source, "info", None)
    if info is None:
        return True
    try:
        return bool(info(name).arithmetic)
    except (KeyError, AttributeError):
        return True


class ModelDeltaSource:
    """``DeltaSource`` of ``model - base`` over the comparable names (base namespace).

    For a resized vocabulary the delta covers the shared rows only: its ``shape`` has
    ``min(base_rows, model_rows)`` rows.
    """

    def __init__(
        self,
        model: TensorSource,
        base: TensorSource,
        *,
        alignment: NameAlignment,
        names: list[str],
        rows: Mapping[str, int],
    ) -> None:
        self._model = model
        self._base = base
        self._alignment = alignment
        self._names = names
        self._rows = dict(rows)

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self._base.shape(self._base_name(name))
        if name in self._rows:
            return (self._rows[name], *shape[1:])
        return shape

    def _base_name(self, name: str) -> str:
        return self._alignment.base_aliases.get(name, name)

    @property
    def model(self) -> TensorSource:
        return self._model

    @property
    def base(self) -> TensorSource:
        return self._base

    def pair(self, name: str) -> tuple[str, str, int | None]:
        """What ``delta(name)`` subtracts: the model's name, the base's name and the number
        of shared leading rows compared (None: the whole tensor), for a caller that reads
        the two tensors itself (``auditor.analysis.delta_print``)."""
        return self._alignment.to_model[name], self._base_name(name), self._rows.get(name)

    def delta(self, name: str) -> torch.Tensor:
        mname = self._alignment.to_model[name]
        bname = self._base_name(name)
        if name in self._rows:
            n = self._rows[name]
            out = self._model.get_rows(mname, 0, n)
            out.sub_(self._base.get_rows(bname, 0, n))
            return out
        out = self._model.get(mname)
        # In place: the base copy is freed right after, so peak is two tensors. A base
        # that hands out its stored dtype (bf16) is subtracted as is, with no float32 copy.
        stored = getattr(self._base, "get_stored", None)
        out.sub_(stored(bname) if stored is not None else self._base.get(bname))
        return out

    def close(self) -> None:
        # The caller opened model and base (and may compare them again): it closes them.
        pass


def model_deltas(
    model: TensorSource,
    base: TensorSource,
    *,
    model_config: Mapping[str, Any] | None = None,
    base_config: Mapping[str, Any] | None = None,
) -> tuple[ModelDeltaSource, TaskVectorReport]:
    """Pair a model's tensors with its base's and give the task vector lazily.

    Raises ``ShapeMismatch`` when no tensor at all can be compared (different architectures).
    """
    alignment = align_names(model, base, model_config=model_config, base_config=base_config)
    base_names = set(base.keys()) | set(alignment.base_aliases)
    model_names = set(alignment.to_model)
    compared: list[str] = []
    rows: dict[str, int] = {}
    resized: dict[str, tuple[int, int]] = {}
    added: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for name in sorted(base_names & model_names):
        mname = alignment.to_model[name]
        bname = alignment.base_aliases.get(name, name)
        mshape, bshape = model.shape(mname), base.shape(bname)
        if not (_arithmetic(model, mname) and _arithmetic(base, bname)):
            skipped[name] = "stored dtype not comparable (e.g. fp8 without scales)"
            continue
        if mshape == bshape:
            compared.append(name)
            continue
        if len(mshape) == len(bshape) >= 1 and mshape[1:] == bshape[1:] and _is_vocab_tensor(name):
            resized[name] = (bshape[0], mshape[0])
            rows[name] = min(bshape[0], mshape[0])
            if mshape[0] > bshape[0]:
                added[name] = mshape[0] - bshape[0]
            compared.append(name)
            continue
        skipped[name] = f"shape {mshape} in the model vs {bshape} in the base"
    if not compared:
        if skipped:
            example = next(iter(skipped.items()))
            raise ShapeMismatch(
                f"no tensor of the model matches its base in shape ({len(skipped)} shared "
                f"name(s), e.g. {example[0]}: {example[1]})"
            )
        raise ShapeMismatch(
            "the model and the base share no tensor names (different architectures?)"
        )
    report = TaskVectorReport(
        compared=tuple(compared),
        only_model=tuple(sorted(model_names - base_names)),
        only_base=tuple(sorted(base_names - model_names)),
        resized=resized,
        tied=alignment.tied,
        skipped=skipped,
        name_mapping=alignment.mapping.describe(),
        added_rows=added,
    )
    return (
        ModelDeltaSource(model, base, alignment=alignment, names=compared, rows=rows),
        report,
    )


def delta_norms(source: Any) -> dict[str, float]:
    """Frobenius norm of every delta, streaming one tensor at a time."""
    out: dict[str, float] = {}
    for name in source.keys():
        d = source.delta(name)
        out[name] = float(torch.linalg.vector_norm(d))
        del d
    return out
