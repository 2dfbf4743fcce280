"""Strict validation of a safetensors header before any library touches the file.

A downloaded file is untrusted input: a lying header length, offsets outside the data area or
overlapping tensors could make a reader allocate huge buffers or return garbage. We check
everything the format promises, through any ``ByteSource`` (a local file or HTTP Range reads),
and only then hand a local file to ``safetensors.safe_open``.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from auditor.bounded import json_limits, loads_json
from auditor.errors import AuditorError, MalformedSafetensors
from auditor.settings import get_settings
from auditor.weights.base import ByteSource

# safetensors' own Rust reader refuses headers above 100 MB; Hub metadata reads use 25 MB.
DEFAULT_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class DTypeInfo:
    name: str
    itemsize: int
    torch_dtype: torch.dtype | None
    arithmetic: bool  # False: stored values are not the weights (fp8 needs scales) or no torch type


def _tdtype(attr: str) -> torch.dtype | None:
    return getattr(torch, attr, None)


DTYPES: dict[str, DTypeInfo] = {
    "F64": DTypeInfo("F64", 8, torch.float64, True),
    "F32": DTypeInfo("F32", 4, torch.float32, True),
    "F16": DTypeInfo("F16", 2, torch.float16, True),
    "BF16": DTypeInfo("BF16", 2, torch.bfloat16, True),
    "I64": DTypeInfo("I64", 8, torch.int64, True),
    "I32": DTypeInfo("I32", 4, torch.int32, True),
    "I16": DTypeInfo("I16", 2, torch.int16, True),
    "I8": DTypeInfo("I8", 1, torch.int8, True),
    "U8": DTypeInfo("U8", 1, torch.uint8, True),
    "BOOL": DTypeInfo("BOOL", 1, torch.bool, True),
    "U16": DTypeInfo("U16", 2, _tdtype("uint16"), True),
    "U32": DTypeInfo("U32", 4, _tdtype("uint32"), True),
    "U64": DTypeInfo("U64", 8, _tdtype("uint64"), True),
    # fp8 checkpoints carry separate scale tensors: raw values are not comparable weights.
    "F8_E4M3": DTypeInfo("F8_E4M3", 1, _tdtype("float8_e4m3fn"), False),
    "F8_E5M2": DTypeInfo("F8_E5M2", 1, _tdtype("float8_e5m2"), False),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data area, as in the header
    end: int

    @property
    def dtype_info(self) -> DTypeInfo:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def arithmetic(self) -> bool:
        return self.dtype_info.arithmetic and self.dtype_info.torch_dtype is not None


@dataclass(frozen=True)
class SafetensorsHeader:
    source_name: str
    file_size: int
    header_size: int  # the JSON length stored in the first 8 bytes
    tensors: MappingProxyType[str, TensorInfo]
    metadata: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start


class LocalFile:
    """``ByteSource`` over a local file with ``os.pread`` (no shared file position)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        self.bytes_read = 0

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise MalformedSafetensors(
                f"{self.path}: read of {length} bytes at {offset} is beyond the file "
                f"({self._size} bytes)"
            )
        chunks = []
        done = 0
        while done < length:
            chunk = os.pread(self._fd, length - done, offset + done)
            if not chunk:
                raise MalformedSafetensors(f"{self.path}: file shrank while reading")
            chunks.append(chunk)
            done += len(chunk)
        self.bytes_read += length
        return b"".join(chunks)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LocalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # Two entries for one name: which one a reader picks is undefined, so refuse.
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_header(
    source: ByteSource,
    *,
    name: str | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_tensors: int | None = None,
) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file through ``source``.

    Raises ``MalformedSafetensors`` naming the file and the problem.
    """
    label = name or str(getattr(source, "path", None) or getattr(source, "url", None) or source)

    def bad(problem: str) -> MalformedSafetensors:
        return MalformedSafetensors(f"{label}: {problem}")

    size = source.size
    if size < 8:
        raise bad(f"truncated file: {size} bytes, too short for the 8-byte header length")
    n = int.from_bytes(source.read(0, 8), "little", signed=False)
    if n > max_header_bytes:
        raise bad(f"header length {n} exceeds the limit of {max_header_bytes} bytes")
    if n > size - 8:
        raise bad(f"header length {n} is beyond the file ({size} bytes): truncated or corrupt")
    if n < 2:
        raise bad(f"header length {n} is too small for a JSON object")
    raw = source.read(8, n)
    limits = json_limits(max_bytes=max_header_bytes)
    tensor_cap = max_tensors if max_tensors is not None else get_settings().max_tensors
    # Counted on the raw bytes before parsing: 1.5 M zero-size entries would otherwise cost
    # gigabytes of dicts before any check ran.
    if raw.count(b'"data_offsets"') > tensor_cap + 1:
        raise bad(f"header declares more than {tensor_cap} tensors (limit)")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        obj = loads_json(raw, name="header", limits=limits,
                         object_pairs_hook=_no_duplicate_keys)
    except AuditorError as exc:
        raise bad(f"header is not valid JSON or breaks a limit: {exc}") from None
    except ValueError as exc:  # duplicate keys
        raise bad(f"header is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise bad(f"header is a JSON {type(obj).__name__}, expected an object")

    metadata: dict[str, str] = {}
    meta_obj = obj.pop("__metadata__", None)
    if meta_obj is not None:
        if not isinstance(meta_obj, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta_obj.items()
        ):
            raise bad("__metadata__ must map strings to strings")
        metadata = dict(meta_obj)

    data_size = size - 8 - n
    if len(obj) > tensor_cap:
        raise bad(f"header declares {len(obj)} tensors (limit {tensor_cap})")
    tensors: dict[str, TensorInfo] = {}
    for tname, entry in obj.items():
        tensors[tname] = _parse_entry(tname, entry, data_size, bad)

    # No two tensors may share bytes: sort by start and compare each with the previous end.
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_, prev_end, prev_name), (begin, _, tname) in itertools.pairwise(spans):
        if begin < prev_end:
            raise bad(f"tensors {prev_name!r} and {tname!r} have overlapping data offsets")
    return SafetensorsHeader(
        source_name=label,
        file_size=size,
        header_size=n,
        tensors=MappingProxyType(tensors),
        metadata=MappingProxyType(metadata),
    )


def _parse_entry(tname: str, entry: Any, data_size: int, bad: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise bad(f"tensor {tname!r}: entry is not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"tensor {tname!r}: unknown dtype {dtype!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"tensor {tname!r}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise bad(f"tensor {tname!r}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise bad(f"tensor {tname!r}: invalid data_offsets [{begin}, {end}]")
    if end > data_size:
        raise bad(
            f"tensor {tname!r}: data_offsets [{begin}, {end}] are out of range "
            f"(data area is {data_size} bytes; truncated file?)"
        )
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise bad(
            f"tensor {tname!r}: shape {shape} of {dtype} needs {expected} bytes but "
            f"data_offsets span {end - begin}"
        )
    return TensorInfo(name=tname, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def validate_file(
    path: Path | str, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Validate a local safetensors file's header (reads only the header bytes)."""
    try:
        src = LocalFile(path)
    except OSError as exc:
        raise MalformedSafetensors(f"{path}: cannot open ({exc.strerror})") from None
    with src:
        return parse_header(src, name=str(path), max_header_bytes=max_header_bytes)


def decode_float32(
    raw: bytes | bytearray, info: TensorInfo, shape: tuple[int, ...]
) -> torch.Tensor:
    """Little-endian raw bytes of ``info``'s dtype -> a fresh float32 tensor of ``shape``."""
    dt = info.dtype_info
    if dt.torch_dtype is None:
        raise MalformedSafetensors(f"tensor {info.name!r}: dtype {info.dtype} has no torch type")
    if len(raw) == 0:
        return torch.zeros(shape, dtype=torch.float32)
    # frombuffer needs a writable buffer to avoid a warning; bytearray copies once.
    buf = raw if isinstance(raw, bytearray) else bytearray(raw)
    flat = torch.frombuffer(buf, dtype=torch.uint8).view(dt.torch_dtype)
    return flat.reshape(shape).to(torch.float32)
