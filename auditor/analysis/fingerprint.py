"""Fingerprints: a compact, comparable summary of one model's task vector.

For every tensor we keep the values at a fixed pseudo-random set of up to ``sample_size``
coordinates, plus exact full-tensor statistics (squared norm, element count, fraction of
exact zeros). The coordinates depend only on the tensor's name and shape (never on the
model), so two fingerprints of models that share a base sample the *same* coordinates and
their samples can be compared element by element, and an exact linear relation between
task vectors (a merge) still holds exactly between their samples.

Error bound. With ``k`` of ``n`` coordinates sampled uniformly without replacement, the
weighted sample inner product ``(n/k) * sum_S x_i y_i`` is an unbiased estimate of the full
inner product, and a cosine estimated from the samples has a standard error of about
``sqrt((1 - c**2) / k)`` (times the finite-population factor ``sqrt(1 - k/n)``), where ``c``
is the true cosine. With k = 4096 and c = 0 that is ~0.016 per tensor; a whole model pools
hundreds of tensors, so global cosines are far tighter. When ``n <= k`` the whole tensor is
kept and every figure is exact. ``Fingerprint.error_bound`` reports the pooled figure.

Serialization is safetensors bytes (samples as float32 tensors, everything else as JSON in
the header metadata): never pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from auditor.errors import AnalysisError, NonFiniteWeights
from auditor.weights.base import DeltaSource, TensorSource

FINGERPRINT_VERSION = 1
DEFAULT_SAMPLE_SIZE = 4096

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_group(name: str) -> str:
    """Group a tensor belongs to: ``layer.{i}`` for transformer blocks, else its role."""
    m = _LAYER_RE.search(name)
    if m:
        return f"layer.{int(m.group(1))}"
    if "embed" in name or "wte" in name or "wpe" in name:
        return "embed"
    if "lm_head" in name:
        return "lm_head"
    if "norm" in name:
        return "norm"
    return "other"


def group_sort_key(group: str) -> tuple[int, int, str]:
    """Order groups by depth: embeddings, layers 0..L-1, final norm, head, the rest."""
    if group == "embed":
        return (0, 0, group)
    if group.startswith("layer."):
        return (1, int(group.split(".", 1)[1]), group)
    order = {"norm": 2, "lm_head": 3}
    return (order.get(group, 4), 0, group)


def sample_indices(name: str, shape: tuple[int, ...], sample_size: int) -> np.ndarray:
    """The flat coordinates sampled for a tensor: the same for every model (seeded by name
    and shape only), sorted, without replacement; all of them when the tensor is small."""
    numel = math.prod(shape) if shape else 1
    if numel <= sample_size:
        return np.arange(numel, dtype=np.int64)
    digest = hashlib.sha256(f"{name}|{tuple(shape)}|v{FINGERPRINT_VERSION}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    idx = rng.choice(numel, size=sample_size, replace=False)
    idx.sort()
    return idx.astype(np.int64)


@dataclass(frozen=True)
class TensorPrint:
    """One tensor of a fingerprint."""

    name: str
    shape: tuple[int, ...]
    numel: int
    sq_norm: float  # exact, over the whole tensor
    zero_fraction: float  # exact fraction of coordinates equal to 0.0
    group: str
    sample: np.ndarray  # float32 values at ``sample_indices(name, shape, k)``

    @property
    def exact(self) -> bool:
        """True when the sample is the whole tensor."""
        return self.sample.shape[0] == self.numel

    @property
    def weight(self) -> float:
        """Factor turning a sample inner product into a full-tensor estimate (n / k)."""
        return self.numel / max(1, self.sample.shape[0])


@dataclass(frozen=True)
class Fingerprint:
    """Sampled task vector of one model (see the module docstring for the error bound)."""

    tensors: Mapping[str, TensorPrint]
    sample_size: int = DEFAULT_SAMPLE_SIZE
    meta: Mapping[str, str] = field(default_factory=dict)
    # A disguised model's task vector *before* alignment: a merge that took in the
    # disguised copy as published is a combination of this one (``lineage``)
    raw: Fingerprint | None = None

    # -- summaries -------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self.tensors)

    @property
    def sq_norm(self) -> float:
        return float(sum(t.sq_norm for t in self.tensors.values()))

    @property
    def norm(self) -> float:
        return math.sqrt(self.sq_norm)

    @property
    def numel(self) -> int:
        return int(sum(t.numel for t in self.tensors.values()))

    @property
    def zero_fraction(self) -> float:
        """Exact fraction of task-vector coordinates equal to zero (TIES/DARE leave many)."""
        n = self.numel
        if n == 0:
            return 0.0
        return float(sum(t.zero_fraction * t.numel for t in self.tensors.values()) / n)

    @property
    def is_exact(self) -> bool:
        return all(t.exact for t in self.tensors.values())

    @property
    def sampled_coordinates(self) -> int:
        return int(sum(t.sample.shape[0] for t in self.tensors.values()))

    @property
    def error_bound(self) -> float:
        """Standard error of a global cosine near 0 estimated from this fingerprint's samples
        (~ sqrt(1/k) over the pooled sample, with the finite-population correction);
        0.0 when every tensor is kept whole."""
        if self.is_exact:
            return 0.0
        k = self.sampled_coordinates
        n = max(1, self.numel)
        return math.sqrt(max(0.0, 1.0 - k / n) / max(1, k))

    def cosine_error(self, cosine: float) -> float:
        """Standard error of an estimated cosine whose true value is ``cosine``."""
        return self.error_bound * math.sqrt(max(0.0, 1.0 - cosine * cosine))

    def groups(self) -> dict[str, list[str]]:
        """Group name -> tensor names, groups ordered by depth."""
        out: dict[str, list[str]] = {}
        for name in self.keys():
            out.setdefault(self.tensors[name].group, []).append(name)
        return dict(sorted(out.items(), key=lambda kv: group_sort_key(kv[0])))

    def group_sq_norms(self) -> dict[str, float]:
        return {
            g: float(sum(self.tensors[n].sq_norm for n in names))
            for g, names in self.groups().items()
        }

    def weighted_sample(self, name: str) -> np.ndarray:
        """Sample scaled by sqrt(n/k): dot products of these estimate full inner products."""
        t = self.tensors[name]
        return (t.sample.astype(np.float64)) * math.sqrt(t.weight)

    def common_keys(self, other: Fingerprint) -> list[str]:
        """Tensors both fingerprints hold with the same shape and sample size."""
        out = []
        for name in self.keys():
            o = other.tensors.get(name)
            t = self.tensors[name]
            if o is not None and o.shape == t.shape and o.sample.shape == t.sample.shape:
                out.append(name)
        return out

    # -- serialization ---------------------------------------------------------
    def to_bytes(self) -> bytes:
        """safetensors bytes: one float32 tensor per sample, the rest as header JSON."""
        from safetensors.torch import save

        tensors, info = _pack(self, "")
        metadata = {
            "format": "auditor-fingerprint",
            "version": str(FINGERPRINT_VERSION),
            "sample_size": str(self.sample_size),
            "tensors": json.dumps(info, sort_keys=True),
            "meta": json.dumps(dict(self.meta), sort_keys=True),
        }
        if self.raw is not None:
            raw_tensors, raw_info = _pack(self.raw, RAW_PREFIX)
            tensors.update(raw_tensors)
            metadata["raw_tensors"] = json.dumps(raw_info, sort_keys=True)
        return save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> Fingerprint:
        from safetensors.torch import load

        try:
            tensors = load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
        except Exception as exc:  # malformed bytes from the store: say so plainly
            raise AnalysisError(f"not a fingerprint: {exc}") from exc
        metadata = header.get("__metadata__") or {}
        if metadata.get("format") != "auditor-fingerprint":
            raise AnalysisError("not a fingerprint: missing auditor-fingerprint header")
        if int(metadata.get("version", "0")) != FINGERPRINT_VERSION:
            raise AnalysisError(f"fingerprint version {metadata.get('version')} not supported")
        size = int(metadata["sample_size"])
        raw = None
        if "raw_tensors" in metadata:
            raw = cls(tensors=_unpack(json.loads(metadata["raw_tensors"]), tensors, RAW_PREFIX),
                      sample_size=size)
        return cls(
            tensors=_unpack(json.loads(metadata["tensors"]), tensors, ""),
            sample_size=size,
            meta=json.loads(metadata.get("meta", "{}")),
            raw=raw,
        )


RAW_PREFIX = "raw::"


def _pack(fp: Fingerprint, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {
        prefix + name: torch.from_numpy(np.ascontiguousarray(t.sample, dtype=np.float32))
        for name, t in fp.tensors.items()
    }
    info = {
        name: {"shape": list(t.shape), "numel": t.numel, "sq_norm": t.sq_norm,
               "zero_fraction": t.zero_fraction, "group": t.group}
        for name, t in fp.tensors.items()
    }
    return tensors, info


def _unpack(
    info: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], prefix: str
) -> dict[str, TensorPrint]:
    prints: dict[str, TensorPrint] = {}
    for name, d in info.items():
        if prefix + name not in tensors:
            raise AnalysisError(f"fingerprint lacks the sample of {name}")
        prints[name] = TensorPrint(
            name=name,
            shape=tuple(int(s) for s in d["shape"]),
            numel=int(d["numel"]),
            sq_norm=float(d["sq_norm"]),
            zero_fraction=float(d["zero_fraction"]),
            group=str(d["group"]),
            sample=tensors[prefix + name].numpy().astype(np.float32),
        )
    return prints


_NORM_BLOCK = 1 << 22


def _sq_norm(flat: torch.Tensor) -> float:
    """Sum of squares accumulated in float64 (float32 sums over 10^8 entries lose digits),
    a block at a time: a float64 copy of a 128k-row embedding would be 2 GB."""
    total = 0.0
    for start in range(0, flat.numel(), _NORM_BLOCK):
        block = flat[start:start + _NORM_BLOCK].to(torch.float64)
        total += float(torch.dot(block, block))
    return total


def tensor_print(
    name: str, tensor: torch.Tensor, *, sample_size: int = DEFAULT_SAMPLE_SIZE
) -> TensorPrint:
    """Fingerprint one tensor (already a task vector, or raw weights for a base print)."""
    shape = tuple(int(s) for s in tensor.shape)
    flat = tensor.detach().reshape(-1).to(torch.float32)
    numel = flat.numel()
    idx = sample_indices(name, shape, sample_size)
    sample = flat[torch.from_numpy(idx)].numpy().astype(np.float32, copy=True)
    sq = _sq_norm(flat)
    zeros = float(numel - int(torch.count_nonzero(flat))) / max(1, numel)
    return TensorPrint(
        name=name,
        shape=shape,
        numel=numel,
        sq_norm=sq,
        zero_fraction=zeros,
        group=layer_group(name),
        sample=sample,
    )


def _skip(name: str, include: Iterable[str] | None, exclude: Iterable[str]) -> bool:
    if any(x in name for x in exclude):
        return True
    return include is not None and not any(x in name for x in include)


def compute_fingerprint(
    deltas: DeltaSource,
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    meta: Mapping[str, str] | None = None,
) -> Fingerprint:
    """Fingerprint a task vector, streaming one tensor at a time.

    ``include`` / ``exclude`` are substrings of tensor names to keep / drop (e.g. drop
    ``embed_tokens`` when vocabularies differ).
    """
    if sample_size < 1:
        raise AnalysisError("sample_size must be positive")
    inc = list(include) if include is not None else None
    exc = list(exclude)
    prints = (
        tensor_print(name, deltas.delta(name), sample_size=sample_size)
        for name in deltas.keys() if not _skip(name, inc, exc)
    )
    return assemble_fingerprint(prints, sample_size=sample_size, meta=meta)


def assemble_fingerprint(
    tensor_prints: Iterable[TensorPrint],
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    meta: Mapping[str, str] | None = None,
) -> Fingerprint:
    """The fingerprint of these tensor prints (consumed one at a time), those holding NaN
    or infinity left out and named in ``meta``; raises when none is left."""
    prints: dict[str, TensorPrint] = {}
    nonfinite: list[str] = []
    for tp in tensor_prints:
        # The float64 sum of squares of float32 values is finite iff every value is: one NaN
        # or inf would poison every cosine and fit, so such tensors are left out (and named).
        if not math.isfinite(tp.sq_norm):
            nonfinite.append(tp.name)
            continue
        prints[tp.name] = tp
    if not prints:
        if nonfinite:
            raise NonFiniteWeights(
                f"all {len(nonfinite)} tensors hold NaN or infinite values", tensors=nonfinite)
        raise AnalysisError("no tensors to fingerprint")
    out_meta = dict(meta or {})
    if nonfinite:
        out_meta[NONFINITE_META] = json.dumps(nonfinite[:MAX_NONFINITE_NAMES])
    return Fingerprint(tensors=prints, sample_size=sample_size, meta=out_meta)


NONFINITE_META = "nonfinite_tensors"
MAX_NONFINITE_NAMES = 1000


def is_finite(fp: Fingerprint) -> bool:
    """Every norm and sample finite (fingerprints stored before non-finite tensors were
    left out may hold NaN: one such homologue would poison every fit it enters)."""
    return all(math.isfinite(t.sq_norm) and bool(np.isfinite(t.sample).all())
               for t in fp.tensors.values())


def nonfinite_tensors(fp: Fingerprint) -> list[str]:
    """Names of the tensors ``compute_fingerprint`` left out for holding NaN / infinity."""
    raw = fp.meta.get(NONFINITE_META)
    return list(json.loads(raw)) if raw else []


def fingerprint_weights(
    source: TensorSource,
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> Fingerprint:
    """Fingerprint raw weights (the base model's theta_B): the base term of a merge fit."""
    return compute_fingerprint(
        _WeightsAsDeltas(source),
        sample_size=sample_size,
        include=include,
        exclude=exclude,
        meta={"kind": "weights"},
    )


class _WeightsAsDeltas:
    """Present a TensorSource through the DeltaSource protocol (delta = the weights)."""

    def __init__(self, source: TensorSource) -> None:
        self._s = source

    def keys(self) -> list[str]:
        return self._s.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._s.shape(name)

    def delta(self, name: str) -> torch.Tensor:
        return self._s.get(name)

    def close(self) -> None:
        self._s.close()


def exact_inner_products(
    a: DeltaSource, b: DeltaSource, *, names: Iterable[str] | None = None
) -> dict[str, float]:
    """Exact full-tensor inner products <a, b> per tensor, streaming: for when both task
    vectors are at hand and the sampled estimate is not good enough."""
    keys = list(names) if names is not None else sorted(set(a.keys()) & set(b.keys()))
    out: dict[str, float] = {}
    for name in keys:
        x = a.delta(name).reshape(-1).to(torch.float64)
        y = b.delta(name).reshape(-1).to(torch.float64)
        if x.shape != y.shape:
            continue
        out[name] = float(torch.dot(x, y).item())
    return out
