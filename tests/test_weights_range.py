"""Range mode: rows of a safetensors file through a ByteSource, reading only what is needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from auditor.errors import MalformedSafetensors, WeightsError
from auditor.weights.base import ByteSource
from auditor.weights.range_mode import RangeSafetensors
from auditor.weights.safetensors_io import LocalFile
from tests.weights_helpers import raw_safetensors


class CountingSource:
    """A ByteSource over bytes in memory that counts requests and bytes, like a Range client."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.requests: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        if offset + length > len(self.data):
            raise MalformedSafetensors("read beyond the end")
        self.requests.append((offset, length))
        return self.data[offset : offset + length]

    @property
    def bytes_read(self) -> int:
        return sum(n for _, n in self.requests)


def _file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    t = {
        "embed": torch.randn(2000, 64, generator=g),
        "h16": torch.randn(300, 32, generator=g).half(),
        "bf": torch.randn(100, 8, generator=g).bfloat16(),
        "vec": torch.randn(16, generator=g),
        "q8": torch.zeros(4, dtype=torch.float8_e4m3fn),
    }
    save_file(t, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors", t


def test_read_rows_fetches_a_small_fraction(tmp_path: Path) -> None:
    path, t = _file(tmp_path)
    src = CountingSource(path.read_bytes())
    assert isinstance(src, ByteSource)
    rs = RangeSafetensors(src, name="model.safetensors")
    header_bytes = src.bytes_read
    assert len(src.requests) == 2  # the 8-byte length, then the JSON header
    rows = rs.read_rows("embed", 100, 102)
    assert torch.equal(rows, t["embed"][100:102])
    assert src.bytes_read - header_bytes == 2 * 64 * 4
    assert src.bytes_read < src.size / 50


def test_half_precision_and_whole_tensors(tmp_path: Path) -> None:
    path, t = _file(tmp_path)
    with LocalFile(path) as lf:
        rs = RangeSafetensors(lf)
        assert rs.keys() == ["bf", "embed", "h16", "q8", "vec"]
        got = rs.read_rows("h16", 5, 9)
        assert got.dtype == torch.float32 and torch.equal(got, t["h16"][5:9].float())
        assert torch.equal(rs.get_rows("bf", 98, 200), t["bf"][98:].float())  # clamped
        assert rs.read_rows("bf", 50, 50).shape == (0, 8)
        assert torch.equal(rs.get("vec"), t["vec"])
        assert torch.equal(rs.get("h16"), t["h16"].float())
        assert rs.shape("embed") == (2000, 64)
        with pytest.raises(WeightsError, match="F8_E4M3"):
            rs.read_rows("q8", 0, 1)


def test_range_rejects_malformed_header() -> None:
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    with pytest.raises(MalformedSafetensors, match=r"remote\.safetensors: .*out of range"):
        RangeSafetensors(
            CountingSource(raw_safetensors(header, bytes(8))), name="remote.safetensors"
        )
    with pytest.raises(MalformedSafetensors, match="beyond the file"):
        RangeSafetensors(CountingSource(raw_safetensors(header, bytes(16), length=10**6)))
