"""Header validation, the safetensors reader, shards and the file inventory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from auditor.errors import AuditorError, MalformedSafetensors, NoWeights, WeightsError
from auditor.weights.inventory import classify_files
from auditor.weights.reader import open_model
from auditor.weights.safetensors_io import LocalFile, parse_header, validate_file
from tests.weights_helpers import raw_safetensors, write

F32 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def _bad(tmp_path: Path, blob: bytes, match: str, **kw) -> None:
    path = write(tmp_path / "bad.safetensors", blob)
    with pytest.raises(MalformedSafetensors, match=match) as info:
        validate_file(path, **kw)
    assert "bad.safetensors" in str(info.value)  # the message names the file


# --- header validation -------------------------------------------------------------
def test_valid_header_parsed(tmp_path: Path) -> None:
    t = {"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.ones(4)}
    save_file(t, tmp_path / "m.safetensors", metadata={"format": "pt"})
    h = validate_file(tmp_path / "m.safetensors")
    assert h.tensors["a"].shape == (2, 3) and h.tensors["a"].dtype == "F16"
    assert h.tensors["b"].nbytes == 16
    assert h.metadata == {"format": "pt"}
    assert h.data_start + h.data_size == (tmp_path / "m.safetensors").stat().st_size


def test_truncated_file(tmp_path: Path) -> None:
    _bad(tmp_path, b"\x10\x00\x00", "truncated file")


def test_truncated_data_area(tmp_path: Path) -> None:
    # Header is fine but the last tensor's bytes were cut off.
    _bad(tmp_path, raw_safetensors({"w": F32}, bytes(10)), "out of range")


def test_header_length_beyond_file(tmp_path: Path) -> None:
    _bad(tmp_path, raw_safetensors({"w": F32}, bytes(16), length=5000), "beyond the file")


def test_huge_header_length(tmp_path: Path) -> None:
    blob = struct.pack("<Q", 2**63) + b"{}"
    _bad(tmp_path, blob, "exceeds the limit")
    # A configurable limit applies too.
    _bad(tmp_path, raw_safetensors({"w": F32}, bytes(16)), "exceeds the limit", max_header_bytes=10)


def test_non_json_header(tmp_path: Path) -> None:
    text = b"not json at all!"
    _bad(tmp_path, struct.pack("<Q", len(text)) + text, "not valid JSON")
    arr = b"[1, 2, 3]"
    _bad(tmp_path, struct.pack("<Q", len(arr)) + arr, "expected an object")
    latin = b'{"\xff": 1}'
    _bad(tmp_path, struct.pack("<Q", len(latin)) + latin, "UTF-8")


def test_duplicate_names(tmp_path: Path) -> None:
    text = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}'
    _bad(tmp_path, struct.pack("<Q", len(text)) + text + bytes(4), "duplicate")


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    _bad(tmp_path, raw_safetensors(header, bytes(24)), "overlapping")


def test_out_of_range_offsets(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [100, 116]}}
    _bad(tmp_path, raw_safetensors(header, bytes(16)), "out of range")
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}
    _bad(tmp_path, raw_safetensors(header, bytes(16)), "invalid data_offsets")


def test_unknown_dtype(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}
    _bad(tmp_path, raw_safetensors(header, bytes(16)), "unknown dtype 'F128'")


def test_shape_size_mismatch(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}}
    _bad(tmp_path, raw_safetensors(header, bytes(16)), "needs 36 bytes")
    header = {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}
    _bad(tmp_path, raw_safetensors(header, bytes(4)), "non-negative")


def test_bad_metadata(tmp_path: Path) -> None:
    header = {"__metadata__": {"k": 3}, "w": F32}
    _bad(tmp_path, raw_safetensors(header, bytes(16)), "__metadata__")


def test_parse_header_reads_only_header(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(1000, 100)}, tmp_path / "m.safetensors")
    with LocalFile(tmp_path / "m.safetensors") as src:
        h = parse_header(src)
        assert src.bytes_read == 8 + h.header_size < 200


def test_malformed_never_reaches_safe_open(tmp_path: Path) -> None:
    # open_model wraps everything into an AuditorError: no crash, no raw SafetensorError.
    write(tmp_path / "model.safetensors", raw_safetensors({"w": F32}, bytes(3)))
    with pytest.raises(AuditorError):
        open_model(tmp_path)


# --- reader --------------------------------------------------------------------------
def test_reader_dtypes_to_float32(tmp_path: Path) -> None:
    ref = torch.randn(5, 3)
    save_file(
        {
            "f32": ref,
            "f16": ref.half(),
            "bf16": ref.bfloat16(),
            "i64": torch.arange(5),
        },
        tmp_path / "model.safetensors",
    )
    with open_model(tmp_path) as m:
        assert m.keys() == ["bf16", "f16", "f32", "i64"]
        for name in ("f32", "f16", "bf16"):
            got = m.get(name)
            assert got.dtype == torch.float32 and got.shape == (5, 3)
        assert torch.equal(m.get("f32"), ref)
        assert torch.equal(m.get("f16"), ref.half().float())
        assert torch.equal(m.get("bf16"), ref.bfloat16().float())
        assert torch.equal(m.get_rows("bf16", 1, 3), ref.bfloat16().float()[1:3])
        assert torch.equal(m.get("i64"), torch.arange(5).float())
        # get() returns a fresh tensor: modifying it does not change the next read.
        m.get("f32").add_(1)
        assert torch.equal(m.get("f32"), ref)


def test_reader_fp8_not_compared(tmp_path: Path) -> None:
    save_file({"q": torch.zeros(4, dtype=torch.float8_e4m3fn)}, tmp_path / "model.safetensors")
    with open_model(tmp_path) as m:
        assert m.dtype("q") == "F8_E4M3"
        with pytest.raises(WeightsError, match="F8_E4M3"):
            m.get("q")


def _sharded(tmp_path: Path) -> dict[str, torch.Tensor]:
    t = {f"model.layers.{i}.w": torch.randn(3, 4) for i in range(4)}
    save_file({k: t[k] for k in list(t)[:2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: t[k] for k in list(t)[2:]}, tmp_path / "model-00002-of-00002.safetensors")
    wm = {k: f"model-0000{1 + i // 2}-of-00002.safetensors" for i, k in enumerate(t)}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": wm})
    )
    return t


def test_sharded_model(tmp_path: Path) -> None:
    t = _sharded(tmp_path)
    files = {p.name: p for p in tmp_path.iterdir()}
    with open_model(files) as m:
        assert m.keys() == sorted(t)
        for k, v in t.items():
            assert torch.equal(m.get(k), v)
        assert len(m.headers) == 2


def test_sharded_index_missing_shard(tmp_path: Path) -> None:
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MalformedSafetensors, match=r"model-00002-of-00002\.safetensors.*missing"):
        open_model(tmp_path)


def test_sharded_index_names_mismatch(tmp_path: Path) -> None:
    _sharded(tmp_path)
    idx = tmp_path / "model.safetensors.index.json"
    obj = json.loads(idx.read_text())
    obj["weight_map"]["model.layers.9.w"] = "model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(obj))
    with pytest.raises(MalformedSafetensors, match=r"layers\.9"):
        open_model(tmp_path)
    obj["weight_map"]["model.layers.9.w"] = "../escape.safetensors"
    idx.write_text(json.dumps(obj))
    with pytest.raises(MalformedSafetensors, match="not a plain file"):
        open_model(tmp_path)
    idx.write_text("{broken")
    with pytest.raises(MalformedSafetensors, match="unreadable shard index"):
        open_model(tmp_path)


def test_repo_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(NoWeights, match="no weight files"):
        open_model(tmp_path)


def test_pickle_only_repo(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(NoWeights, match="pickle"):
        open_model(tmp_path)


def test_adapter_only_repo_points_to_lora(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(NoWeights, match="adapter"):
        open_model(tmp_path)


def test_prefers_model_safetensors(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, tmp_path / "model.safetensors")
    save_file({"a": torch.ones(1)}, tmp_path / "consolidated.safetensors")
    with open_model(tmp_path) as m:
        assert torch.equal(m.get("a"), torch.zeros(1))


def test_duplicate_tensor_across_files(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, tmp_path / "part1.safetensors")
    save_file({"a": torch.ones(1)}, tmp_path / "part2.safetensors")
    with pytest.raises(MalformedSafetensors, match="appears in both"):
        open_model(tmp_path)


# --- inventory -----------------------------------------------------------------------
def test_classify_files() -> None:
    inv = classify_files(
        {
            "config.json": 10,
            "model-00001-of-00002.safetensors": 100,
            "model-00002-of-00002.safetensors": 50,
            "model.safetensors.index.json": 5,
            "pytorch_model.bin": 150,
            "optimizer.pt": 20,
            "onnx/model.safetensors": 7,
            "README.md": 1,
        }
    )
    assert inv.safetensors == (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    )
    assert inv.shard_index == "model.safetensors.index.json"
    assert inv.pickles == ("optimizer.pt", "pytorch_model.bin")
    assert inv.nested_safetensors == ("onnx/model.safetensors",)
    assert inv.has_weights and not inv.only_pickles and not inv.has_adapter
    assert inv.total_weight_bytes == 150

    only_pickles = classify_files({"pytorch_model.bin": 1, "config.json": 1})
    assert only_pickles.only_pickles and not only_pickles.has_weights

    adapter = classify_files({"adapter_config.json": 1, "adapter_model.safetensors": 2})
    assert adapter.has_adapter and adapter.has_weights and adapter.safetensors == ()

    orphan = classify_files({"adapter_model.safetensors": 2})
    assert not orphan.has_adapter and not orphan.has_weights
