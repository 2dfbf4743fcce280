"""Read a few rows of a remote safetensors file without downloading it.

Over a ``ByteSource`` (HTTP Range reads on a Hub file, or a local file): the header comes from
two small reads (8 bytes, then the JSON), then each ``read_rows`` fetches exactly the bytes of
the requested rows, which are contiguous in row-major storage. Good for fingerprints of
embedding rows or sampled layers of a model too big to download.
"""

from __future__ import annotations

import math

import torch

from auditor.errors import WeightsError
from auditor.weights.base import ByteSource
from auditor.weights.safetensors_io import (
    DEFAULT_MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorInfo,
    decode_float32,
    parse_header,
)


class RangeSafetensors:
    """A ``TensorSource`` over one safetensors file reached through a ``ByteSource``."""

    def __init__(
        self,
        source: ByteSource,
        *,
        name: str | None = None,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        self._source = source
        self.header: SafetensorsHeader = parse_header(
            source, name=name, max_header_bytes=max_header_bytes
        )

    def keys(self) -> list[str]:
        return sorted(self.header.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.header.tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def _checked(self, name: str) -> TensorInfo:
        info = self.info(name)
        if not info.arithmetic:
            raise WeightsError(
                f"{self.header.source_name}: tensor {name!r} is stored as {info.dtype}, "
                "which the auditor does not compare"
            )
        return info

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (clamped like a slice, step 1) of dimension 0, as float32."""
        info = self._checked(name)
        if not info.shape:
            raise WeightsError(f"tensor {name!r} is a scalar: it has no rows")
        rows = info.shape[0]
        start, stop, _ = slice(start, stop).indices(rows)
        stop = max(start, stop)
        row_bytes = math.prod(info.shape[1:]) * info.dtype_info.itemsize
        offset = self.header.data_start + info.begin + start * row_bytes
        length = (stop - start) * row_bytes
        raw = self._source.read(offset, length) if length else b""
        return decode_float32(raw, info, (stop - start, *info.shape[1:]))

    def get(self, name: str) -> torch.Tensor:
        info = self._checked(name)
        raw = self._source.read(self.header.data_start + info.begin, info.nbytes)
        return decode_float32(raw, info, info.shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.read_rows(name, start, stop)

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if callable(close):
            close()
