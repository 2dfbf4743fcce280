"""Static scan of pickle-format weight files: what would unpickling import? Never loads them.

Two independent readers look at the opcode stream: picklescan (the scanner users know) and our
own ``pickletools.genops`` walk over every pickle in the file, including each ``*.pkl`` member
of a torch zip archive and the several pickles of torch's legacy format. Imports are the
arguments of GLOBAL / INST / STACK_GLOBAL; a STACK_GLOBAL whose operands we cannot resolve
statically counts as dangerous, since that is how an obfuscated payload would look.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path

from auditor.schema import PickleScan

MAX_MEMBER_BYTES = 512 * 1024 * 1024  # a torch data.pkl is tiny; bigger members are suspect
UNKNOWN = "unknown"

# The allowlist: what torch.save / numpy-bearing state dicts legitimately import. Anything
# else a pickle imports is "dangerous" (critical): a denylist misses gadgets such as
# doctest.run_docstring_examples or logging.config.dictConfig({'()': 'subprocess.Popen'}),
# which run code through stdlib modules nobody thinks of. Each safe name only rebuilds data
# (tensors, storages, arrays, containers); the callables those helpers receive as arguments
# are themselves globals of the same pickle, so they are checked on their own.
SAFE_NAMES = frozenset(
    {("torch._utils", n) for n in (
        "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
        "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
        "_rebuild_nested_tensor", "_rebuild_device_tensor_from_numpy",
        "_rebuild_meta_tensor_no_storage", "_rebuild_xla_tensor", "_rebuild_mtia_tensor",
    )}
    | {("torch._tensor", "_rebuild_from_type_v2"), ("torch._tensor", "_rebuild_from_type"),
       ("torch.nn.parameter", "Parameter"), ("torch", "Size"), ("torch", "device"),
       ("torch", "dtype"), ("torch", "Tensor"), ("torch.storage", "UntypedStorage"),
       ("torch.storage", "TypedStorage"), ("torch", "UntypedStorage"), ("torch", "TypedStorage")}
    | {("collections", "OrderedDict"), ("collections", "defaultdict"), ("_codecs", "encode"),
       ("copyreg", "_reconstructor")}
    | {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
       for n in ("_reconstruct", "scalar")}
    | {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
    | {("numpy", "ndarray"), ("numpy", "dtype")}
    | {("numpy.dtypes", n) for n in ("Float32DType", "Float16DType", "Float64DType",
                                      "Int64DType", "Int32DType", "Int8DType", "UInt8DType",
                                      "BoolDType")}
    | {("builtins", n) for n in ("set", "frozenset", "dict", "list", "tuple", "int", "float",
                                 "complex", "bool", "str", "bytes", "bytearray", "slice",
                                 "range", "object")}
    | {("__builtin__", n) for n in ("set", "frozenset", "slice", "object")}
)  # fmt: skip
# Kept for the message: the families the tests cover (never consulted for a verdict).
KNOWN_GADGET_MODULES = frozenset(
    {"os", "posix", "nt", "subprocess", "runpy", "pty", "webbrowser", "importlib", "doctest",
     "logging.config", "operator", "builtins", "code", "pdb", "ctypes", "shutil", "socket"}
)  # fmt: skip
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
     "BINSTRING", "STRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}
)  # fmt: skip


def classify(module: str, name: str) -> str:
    """``safe`` for an allowlisted global, ``dangerous`` for anything else."""
    if UNKNOWN in (module, name):
        return "dangerous"
    if (module, name) in SAFE_NAMES:
        return "safe"
    # Storage classes and dtypes: torch.FloatStorage, torch.bfloat16, ...
    if module == "torch" and (
        (name.endswith("Storage") and name.isidentifier()) or name in _TORCH_DTYPES
    ):
        return "safe"
    return "dangerous"


_TORCH_DTYPES = frozenset(
    {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
     "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "half", "float",
     "double", "long", "int", "short", "uint16", "uint32", "uint64"}
)  # fmt: skip


def globals_in_stream(data: bytes) -> tuple[list[tuple[str, str]], str | None]:
    """Imports of every pickle concatenated in ``data`` (stops at trailing non-pickle bytes)."""
    found: list[tuple[str, str]] = []
    pos = 0
    error: str | None = None
    first = True
    while pos < len(data):
        if not first and data[pos] != 0x80:
            break  # legacy torch files end with raw storage bytes, not another pickle
        try:
            pos = _one_pickle(data, pos, found)
        except Exception as exc:  # genops raises ValueError and friends on malformed input
            error = f"malformed pickle at byte {pos}: {exc}"
            break
        first = False
    return found, error


_MARK = object()
_MEMO_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})


def _one_pickle(data: bytes, start: int, found: list[tuple[str, str]]) -> int:
    """Walk one pickle, simulating only the stack's shape (pickletools' stack effects).

    Every value is unknown (None) except strings pushed by string opcodes and fetched back
    from the memo, so a STACK_GLOBAL whose operands were computed (e.g. ``str(b"os")``) is
    UNKNOWN, hence dangerous. Nothing is ever called or imported.
    """
    stream = io.BytesIO(data)
    stream.seek(start)
    stack: list[object] = []
    memo: dict[int, object] = {}
    end = len(data)
    for op, arg, pos in pickletools.genops(stream):
        opname = op.name
        if opname in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            found.append((module, name))
        if opname == "STACK_GLOBAL":
            name_v = stack.pop() if stack else None
            module_v = stack.pop() if stack else None
            if isinstance(module_v, str) and isinstance(name_v, str):
                found.append((module_v, name_v))
            else:
                found.append((UNKNOWN, UNKNOWN))
            stack.append(None)
            continue
        if opname == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
            continue
        if opname in _MEMO_PUT:
            memo[int(arg)] = stack[-1] if stack else None
            continue
        if opname in _MEMO_GET:
            stack.append(memo.get(int(arg)))
            continue
        if opname == "DUP":
            stack.append(stack[-1] if stack else None)
            continue
        if opname == "MARK":
            stack.append(_MARK)
            continue
        if opname == "STOP":
            assert pos is not None
            end = pos + 1
            break
        before = op.stack_before
        if pickletools.markobject in before:
            while stack and stack.pop() is not _MARK:
                pass
            for _ in range(before.index(pickletools.markobject)):
                if stack:
                    stack.pop()
        elif opname == "POP" and stack and stack[-1] is _MARK:
            stack.pop()
        else:
            for _ in before:
                if stack:
                    stack.pop()
        for _ in op.stack_after:
            stack.append(arg if opname in _STRING_OPS and isinstance(arg, str) else None)
    return end


def _pickle_members(zf: zipfile.ZipFile) -> Iterator[zipfile.ZipInfo]:
    for info in zf.infolist():
        if info.filename.endswith((".pkl", ".pickle")):
            yield info


def _own_scan(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    errors: list[str] = []
    found: list[tuple[str, str]] = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = list(_pickle_members(zf))
            if not members:
                errors.append("zip archive without a pickle member")
            for info in members:
                if info.file_size > MAX_MEMBER_BYTES:
                    errors.append(f"{info.filename}: {info.file_size} bytes, too large to scan")
                    continue
                g, err = globals_in_stream(zf.read(info))
                found += g
                if err:
                    errors.append(f"{info.filename}: {err}")
        return found, errors
    size = path.stat().st_size
    if size > MAX_MEMBER_BYTES:
        # Legacy torch files hold storages after the pickles: the pickles sit at the start.
        with path.open("rb") as fh:
            data = fh.read(MAX_MEMBER_BYTES)
    else:
        data = path.read_bytes()
    g, err = globals_in_stream(data)
    if err and size > MAX_MEMBER_BYTES and g:
        err = None  # cut mid-storage: the pickles before were parsed completely
    if err:
        errors.append(err)
    return g, errors


def _picklescan(path: Path) -> tuple[dict[tuple[str, str], str], str | None]:
    from picklescan.scanner import SafetyLevel, scan_file_path

    levels = {
        SafetyLevel.Dangerous: "dangerous",
        SafetyLevel.Suspicious: "suspicious",
        SafetyLevel.Innocuous: "safe",
    }
    try:
        result = scan_file_path(str(path))
    except Exception as exc:  # picklescan raises on formats it cannot parse
        return {}, f"picklescan: {exc}"
    out = {(g.module, g.name): levels.get(g.safety, "suspicious") for g in result.globals}
    return out, ("picklescan could not parse the whole file" if result.scan_err else None)


def scan_pickle(path: Path) -> PickleScan:
    """Imports a pickle-format file would perform if loaded, with dangerous ones flagged."""
    path = Path(path)
    try:
        own, errors = _own_scan(path)
    except (OSError, zipfile.BadZipFile) as exc:
        return PickleScan(path=str(path), error=f"cannot read: {exc}")
    ps_levels, ps_error = _picklescan(path)
    rank = {"safe": 0, "suspicious": 1, "dangerous": 2}
    levels: dict[tuple[str, str], str] = {}
    if any("malformed pickle" in e for e in errors):
        # The unpickler runs every opcode before the point where our reader gave up, and
        # may read further than genops does: what it would import there is unknown.
        own = [*own, (UNKNOWN, UNKNOWN)]
    for g in own:
        levels[g] = classify(*g)
    for g, level in ps_levels.items():
        # Keep the stricter verdict when the two scanners disagree.
        mine = levels.get(g, classify(*g))
        levels[g] = level if rank[level] > rank[mine] else mine
    names = {g: f"{g[0]}.{g[1]}" for g in levels}
    error_parts = errors + ([ps_error] if ps_error and errors else [])
    return PickleScan(
        path=str(path),
        dangerous_imports=sorted(names[g] for g, lv in levels.items() if lv == "dangerous"),
        suspicious_imports=sorted(names[g] for g, lv in levels.items() if lv == "suspicious"),
        imports=sorted(names.values()),
        error="; ".join(error_parts) or None,
    )
