"""Static pickle scanning on crafted payloads and a genuine torch.save archive (never loaded)."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from auditor.weights.pickles import classify, globals_in_stream, scan_pickle


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("1+1",))


def test_os_system_payload_is_dangerous(tmp_path: Path) -> None:
    for proto in (0, 2, 4):
        path = tmp_path / f"evil{proto}.bin"
        path.write_bytes(pickle.dumps({"w": _Evil()}, protocol=proto))
        scan = scan_pickle(path)
        assert scan.error is None
        # os.system pickles as posix.system on Linux, nt.system on Windows.
        assert any(d.endswith(".system") for d in scan.dangerous_imports), scan
        assert scan.dangerous_imports[0].split(".")[0] in {"posix", "nt", "os"}


def test_builtins_eval_is_dangerous(tmp_path: Path) -> None:
    path = tmp_path / "eval.pkl"
    path.write_bytes(pickle.dumps([1, _EvalEvil()], protocol=4))
    assert "builtins.eval" in scan_pickle(path).dangerous_imports


def test_payload_inside_torch_zip(tmp_path: Path) -> None:
    # A torch-style archive whose data.pkl carries the payload.
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_Evil(), protocol=2))
        zf.writestr("archive/version", "3\n")
    scan = scan_pickle(path)
    assert any(d.endswith(".system") for d in scan.dangerous_imports)


def test_legit_torch_save_is_clean(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(3, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}, path)
    scan = scan_pickle(path)
    assert scan.error is None
    assert scan.dangerous_imports == []
    assert "torch._utils._rebuild_tensor_v2" in scan.imports
    assert "collections.OrderedDict" in scan.imports or scan.imports


def test_legacy_torch_format_is_scanned(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    scan = scan_pickle(path)
    assert scan.dangerous_imports == []
    assert "torch._utils._rebuild_tensor_v2" in scan.imports


def test_stack_global_via_memo_resolved() -> None:
    blob = pickle.dumps(_Evil(), protocol=4)  # protocol 4 uses STACK_GLOBAL + MEMOIZE
    found, err = globals_in_stream(blob)
    assert err is None
    assert any(name == "system" for _, name in found)


def test_garbage_reports_error_not_crash(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x80\x04\x95garbage that is not a pickle" + bytes(50))
    scan = scan_pickle(path)
    assert scan.error
    missing = scan_pickle(tmp_path / "absent.bin")
    assert missing.error and "cannot read" in missing.error


def test_classify() -> None:
    assert classify("subprocess", "Popen") == "dangerous"
    assert classify("os.path", "join") == "dangerous"
    assert classify("unknown", "unknown") == "dangerous"
    assert classify("torch._utils", "_rebuild_tensor_v2") == "safe"
    assert classify("torch", "FloatStorage") == "safe"
    assert classify("collections", "OrderedDict") == "safe"
    # Allowlist: anything not known to only rebuild data is dangerous.
    assert classify("mylib.layers", "Thing") == "dangerous"
    assert classify("torch._utils", "_load_from_bytes") == "dangerous"
    assert classify("doctest", "run_docstring_examples") == "dangerous"
