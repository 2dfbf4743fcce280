"""Header-only shape fingerprints and fixed-seed row samples of remote safetensors.

Discovery must decide whether a candidate derives from a watched base while reading a few
percent of its bytes. Two things are read, both through ``ByteSource`` range reads:

* the safetensors headers (names, shapes, dtypes): ``read_layout``;
* short chunks of a few rows of a few tensors, at positions drawn from a fixed seed:
  ``plan_samples`` + ``read_samples``. Candidate and base are read at the same positions,
  so the chunks compare element by element.

Every byte goes through a ``CountingSource``, so callers can report (and bound) the cost.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from auditor.bounded import json_limits, loads_json
from auditor.errors import AuditorError, WeightsError
from auditor.weights.base import ByteSource
from auditor.weights.names import EMBED_SUFFIXES, HEAD_SUFFIXES
from auditor.weights.safetensors_io import (
    SafetensorsHeader,
    TensorInfo,
    decode_float32,
    parse_header,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_INDEX_BYTES = 10 << 20
# Wrappers that exports add or drop around the same module tree.
_WRAPPERS = ("base_model.model.", "model.", "transformer.", "gpt_neox.", "backbone.")
# Tensors a PEFT adapter or a value head adds next to the base's own.
_ADAPTER_RE = re.compile(r"(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|v_head|"
                         r"modules_to_save)")
_VOCAB_SUFFIXES = EMBED_SUFFIXES + HEAD_SUFFIXES


class CountingSource:
    """A ``ByteSource`` that counts what it reads (bytes and requests)."""

    def __init__(self, inner: ByteSource) -> None:
        self.inner = inner
        self.bytes_read = 0
        self.requests = 0

    @property
    def size(self) -> int:
        return self.inner.size

    def read(self, offset: int, length: int) -> bytes:
        data = self.inner.read(offset, length)
        self.bytes_read += len(data)
        self.requests += 1
        return data

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()


Opener = Callable[[str], CountingSource]


@dataclass
class Layout:
    """Where every tensor of a (possibly sharded) checkpoint lives."""

    tensors: dict[str, TensorInfo]
    shard_of: dict[str, str]
    headers: dict[str, SafetensorsHeader]
    total_bytes: int

    def normalized(self) -> dict[str, str]:
        """normalized name -> stored name."""
        return {normalize_name(n): n for n in self.tensors}


def normalize_name(name: str) -> str:
    """Drop wrapper prefixes (``base_model.model.``, ``model.``, ``transformer.``...)."""
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if name.startswith(w):
                name, changed = name[len(w):], True
    return name


def read_layout(open_file: Opener, files: Mapping[str, int]
                ) -> tuple[Layout, dict[str, CountingSource]]:
    """Headers of the checkpoint's safetensors files (single file or index + shards).

    ``open_file(name)`` gives a counting source; the sources stay open (returned) so the
    caller can read samples through them and add up their bytes.
    """
    sources: dict[str, CountingSource] = {}

    def src(name: str) -> CountingSource:
        if name not in sources:
            sources[name] = open_file(name)
        return sources[name]

    if SINGLE_FILE in files:
        shard_names = [SINGLE_FILE]
    elif INDEX_FILE in files:
        index_src = src(INDEX_FILE)
        if index_src.size > MAX_INDEX_BYTES:
            raise WeightsError(f"{INDEX_FILE} is {index_src.size} bytes: too large")
        try:
            index = loads_json(index_src.read(0, index_src.size), name=INDEX_FILE,
                               limits=json_limits(max_bytes=MAX_INDEX_BYTES))
            shard_names = sorted(set(index["weight_map"].values()))
        except AuditorError as exc:
            raise WeightsError(f"{INDEX_FILE} is not a valid index: {exc}") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{INDEX_FILE} is not a valid index: {exc}") from exc
    else:
        shard_names = sorted(n for n in files if n.endswith(".safetensors") and "/" not in n
                             and not n.startswith("adapter_"))
    if not shard_names:
        raise WeightsError("no safetensors weights")
    tensors: dict[str, TensorInfo] = {}
    shard_of: dict[str, str] = {}
    headers: dict[str, SafetensorsHeader] = {}
    for shard in shard_names:
        if shard not in files:
            raise WeightsError(f"index names {shard!r}, which the repo does not hold")
        header = parse_header(src(shard), name=shard)
        headers[shard] = header
        for name, info in header.tensors.items():
            tensors[name] = info
            shard_of[name] = shard
    total = sum(files.get(s, 0) for s in shard_names)
    return Layout(tensors=tensors, shard_of=shard_of, headers=headers, total_bytes=total), \
        sources


# --- shape fingerprint ----------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeMatch:
    """How a candidate's tensor layout compares with the base's."""

    base_tensors: int
    matched: int  # same normalized name, same shape
    resized_vocab: list[str] = field(default_factory=list)  # embedding/head, other row count
    mismatched: list[str] = field(default_factory=list)  # same name, other shape
    missing: list[str] = field(default_factory=list)  # in the base, not in the candidate
    adapter_extra: int = 0  # adapter / value-head tensors the base does not have
    other_extra: int = 0
    dtype_changes: int = 0
    pairs: dict[str, str] = field(default_factory=dict)  # base name -> candidate name

    @property
    def score(self) -> float:
        """Share of the base's tensors found with the base's shape (vocab resizes count)."""
        if not self.base_tensors:
            return 0.0
        return (self.matched + len(self.resized_vocab)) / self.base_tensors

    def compatible(self, *, min_score: float = 0.95) -> bool:
        # Every base tensor but a few has to be there with its shape: same architecture,
        # same width and depth. Extra tensors (adapters, heads) are allowed.
        return not self.mismatched and self.score >= min_score


def compare_shapes(base: Mapping[str, TensorInfo], cand: Mapping[str, TensorInfo]
                   ) -> ShapeMatch:
    """Match tensors by normalized name; tolerate renamed prefixes, resized vocabularies
    (embedding/head with another number of rows) and extra adapter tensors."""
    bnorm = {normalize_name(n): n for n in base}
    cnorm = {normalize_name(n): n for n in cand}
    matched = 0
    resized: list[str] = []
    mismatched: list[str] = []
    missing: list[str] = []
    dtype_changes = 0
    pairs: dict[str, str] = {}
    for key, bname in bnorm.items():
        cname = cnorm.get(key)
        if cname is None:
            missing.append(bname)
            continue
        b, c = base[bname], cand[cname]
        if b.dtype != c.dtype:
            dtype_changes += 1
        if b.shape == c.shape:
            matched += 1
            pairs[bname] = cname
        elif (key.endswith(_VOCAB_SUFFIXES) and len(b.shape) == 2 and len(c.shape) == 2
              and b.shape[1] == c.shape[1]):
            resized.append(bname)
            pairs[bname] = cname
        else:
            mismatched.append(bname)
    extras = [n for k, n in cnorm.items() if k not in bnorm]
    adapter = sum(1 for n in extras if _ADAPTER_RE.search(n))
    return ShapeMatch(base_tensors=len(bnorm), matched=matched, resized_vocab=resized,
                      mismatched=mismatched, missing=missing, adapter_extra=adapter,
                      other_extra=len(extras) - adapter, dtype_changes=dtype_changes,
                      pairs=pairs)


# --- row samples ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """``length`` elements of row ``row`` of base tensor ``tensor``, from column ``col``."""

    tensor: str
    row: int
    col: int
    length: int


def _is_vocab(name: str) -> bool:
    return normalize_name(name).endswith(_VOCAB_SUFFIXES)


def _probe_tensors(match: ShapeMatch, base: Mapping[str, TensorInfo], *, seed: int,
                   max_tensors: int) -> list[str]:
    """Which base tensors to sample. Vocabulary tensors (embedding, head) first: every
    function-preserving disguise inside the network (permuted neurons or heads, rescaled
    or mixed heads, "protected" copies) leaves their rows in place, and a resized
    vocabulary keeps the old rows. Then attention matrices from layers drawn with the
    seed; MLP matrices last, because a disguise may permute their rows."""
    usable = [b for b in match.pairs if len(base[b].shape) == 2 and base[b].arithmetic]
    vocab = sorted((b for b in usable if _is_vocab(b)),
                   key=lambda b: not normalize_name(b).endswith(EMBED_SUFFIXES))
    attn = [b for b in usable if not _is_vocab(b) and ("attn" in b or "attention" in b)]
    rest = [b for b in usable if b not in vocab and b not in attn]
    rng = np.random.default_rng(seed)
    order = vocab + [attn[i] for i in rng.permutation(len(attn))] + \
        [rest[i] for i in rng.permutation(len(rest))]
    return order[:max_tensors]


def plan_samples(
    match: ShapeMatch,
    base: Mapping[str, TensorInfo],
    cand: Mapping[str, TensorInfo] | None = None,
    *,
    seed: int,
    budget_bytes: int,
    max_tensors: int = 2,
    chunk_elems: int = 256,
    max_chunks: int = 512,
) -> list[Chunk]:
    """Fixed-seed chunk positions whose candidate bytes fit in ``budget_bytes``.

    Rows of a resized embedding are drawn from the rows both vocabularies have. The same
    seed and shapes give the same plan, so a sample of the base can be reused.
    """
    names = _probe_tensors(match, base, seed=seed, max_tensors=max_tensors)
    if not names:
        return []
    rng = np.random.default_rng(seed + 1)
    infos = [(n, base[n], (cand or base).get(match.pairs[n], base[n])) for n in names]
    per_chunk = max(math.ceil(min(chunk_elems, bi.shape[1]) * ci.dtype_info.itemsize)
                    for _n, bi, ci in infos)
    n_chunks = min(max_chunks, budget_bytes // max(per_chunk, 1))
    if n_chunks < len(names):
        return []
    chunks: list[Chunk] = []
    per_tensor = n_chunks // len(names)
    for name, bi, ci in infos:
        rows = min(bi.shape[0], ci.shape[0])
        cols = bi.shape[1]
        length = min(chunk_elems, cols)
        picked = rng.choice(rows, size=min(per_tensor, rows), replace=False)
        for r in sorted(int(x) for x in picked):
            col = int(rng.integers(0, cols - length + 1))
            chunks.append(Chunk(tensor=name, row=r, col=col, length=length))
    return chunks


def _chunk_span(ch: Chunk, layout: Layout, names: Mapping[str, str] | None
                ) -> tuple[str, TensorInfo, int, int]:
    stored = (names or {}).get(ch.tensor, ch.tensor)
    info = layout.tensors.get(stored)
    if info is None or not info.arithmetic:
        raise WeightsError(f"tensor {stored!r} is missing or not numeric")
    header = layout.headers[layout.shard_of[stored]]
    item = info.dtype_info.itemsize
    offset = header.data_start + info.begin + (ch.row * info.shape[1] + ch.col) * item
    return layout.shard_of[stored], info, offset, ch.length * item


def read_samples(
    chunks: list[Chunk],
    layout: Layout,
    sources: Mapping[str, CountingSource],
    *,
    names: Mapping[str, str] | None = None,
    one_read: bool = False,
) -> list[torch.Tensor]:
    """The chunks' values (float32) read from ``layout``; ``names`` maps base tensor names
    to this checkpoint's names (identity when None). ``one_read`` fetches each file's span
    of chunks in a single read (for servers that ignore Range, where every read streams
    from the start of the file)."""
    spans = [_chunk_span(ch, layout, names) for ch in chunks]
    blocks: dict[str, tuple[int, bytes]] = {}
    if one_read:
        for shard in {sp[0] for sp in spans}:
            lo = min(sp[2] for sp in spans if sp[0] == shard)
            hi = max(sp[2] + sp[3] for sp in spans if sp[0] == shard)
            blocks[shard] = (lo, sources[shard].read(lo, hi - lo))
    out: list[torch.Tensor] = []
    for ch, (shard, info, offset, length) in zip(chunks, spans, strict=True):
        if shard in blocks:
            lo, data = blocks[shard]
            raw = data[offset - lo: offset - lo + length]
        else:
            raw = sources[shard].read(offset, length)
        out.append(decode_float32(raw, info, (ch.length,)))
    return out


def plan_window(
    match: ShapeMatch,
    base: Mapping[str, TensorInfo],
    layout: Layout,
    *,
    seed: int,
    end: int,
    chunk_elems: int = 256,
) -> list[Chunk]:
    """Chunks that lie in the first ``end`` bytes of a single-file candidate: the probe for
    a server that ignores Range, which can only stream from the start of the file."""
    if len(layout.headers) != 1:
        return []
    header = next(iter(layout.headers.values()))
    rng = np.random.default_rng(seed + 2)
    chunks: list[Chunk] = []
    budget = end - header.data_start
    for bname, cname in sorted(match.pairs.items(), key=lambda kv: layout.tensors[kv[1]].begin):
        b, c = base[bname], layout.tensors[cname]
        if len(b.shape) != 2 or not c.arithmetic or c.begin >= budget:
            continue
        row_bytes = c.shape[1] * c.dtype_info.itemsize
        rows = min((budget - c.begin) // row_bytes, b.shape[0], c.shape[0])
        if rows < 1:
            continue
        length = min(chunk_elems, b.shape[1])
        for r in sorted(int(x) for x in rng.choice(rows, size=min(rows, 64), replace=False)):
            col = int(rng.integers(0, b.shape[1] - length + 1))
            chunks.append(Chunk(tensor=bname, row=r, col=col, length=length))
    return chunks


def read_full(layout: Layout, sources: Mapping[str, CountingSource], tensors: list[str],
              *, names: Mapping[str, str] | None = None, rows: int | None = None
              ) -> dict[str, torch.Tensor]:
    """Whole tensors (first ``rows`` rows when given): the full-read reference."""
    out: dict[str, torch.Tensor] = {}
    for t in tensors:
        stored = (names or {}).get(t, t)
        info = layout.tensors[stored]
        header = layout.headers[layout.shard_of[stored]]
        n = info.shape[0] if rows is None else min(rows, info.shape[0])
        row_bytes = math.prod(info.shape[1:]) * info.dtype_info.itemsize
        raw = sources[layout.shard_of[stored]].read(header.data_start + info.begin,
                                                    n * row_bytes)
        out[t] = decode_float32(raw, info, (n, *info.shape[1:]))
    return out


__all__ = [
    "Chunk",
    "CountingSource",
    "Layout",
    "ShapeMatch",
    "compare_shapes",
    "normalize_name",
    "plan_samples",
    "plan_window",
    "read_full",
    "read_layout",
    "read_samples",
]
