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

# Modules where any name gives code execution, file or network access.
DANGEROUS_MODULES = frozenset(
    {
        "os", "posix", "nt", "subprocess", "socket", "runpy", "shutil", "sys", "ctypes", "pty",
        "commands", "webbrowser", "importlib", "marshal", "code", "codeop", "multiprocessing",
        "asyncio", "requests", "urllib", "urllib2", "http", "httplib", "ftplib", "telnetlib",
        "smtplib", "ssl", "pickle", "_pickle", "dill", "cloudpickle", "bdb", "pdb", "cProfile",
        "profile", "timeit", "platform", "signal", "tempfile", "glob", "pathlib", "io",
        "_io", "zipimport", "site", "threading", "_thread", "torch.hub", "torch.jit",
        "torch.package", "torch.utils.cpp_extension", "numpy.f2py", "aiohttp", "pip",
    }
)  # fmt: skip
DANGEROUS_NAMES = frozenset(
    {
        ("builtins", n) for n in (
            "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "__import__",
            "apply", "breakpoint", "input", "globals", "locals", "vars", "memoryview",
        )
    }
    | {("__builtin__", n) for n in ("eval", "exec", "compile", "open", "getattr", "apply",
                                   "__import__", "execfile", "file")}
    | {(m, n) for m in ("operator", "_operator") for n in ("attrgetter", "methodcaller",
                                                             "itemgetter")}
    | {
        ("functools", "partial"), ("functools", "reduce"), ("types", "CodeType"),
        ("types", "FunctionType"), ("torch.serialization", "load"), ("torch", "load"),
        ("numpy", "load"), ("numpy.testing._private.utils", "runstring"),
        ("logging", "FileHandler"), ("code", "InteractiveInterpreter"),
    }
)  # fmt: skip
# What torch.save / a numpy-bearing state dict legitimately imports.
SAFE_MODULES = frozenset({"torch._utils", "torch._tensor", "torch.nn.parameter"})
SAFE_NAMES = frozenset(
    {
        ("collections", "OrderedDict"), ("collections", "defaultdict"), ("_codecs", "encode"),
        ("torch", "Size"), ("torch", "device"), ("torch", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }
    | {("builtins", n) for n in ("set", "frozenset", "dict", "list", "tuple", "int", "float",
                                 "complex", "bool", "str", "bytes", "bytearray", "slice",
                                 "range", "object")}
)  # fmt: skip
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
     "BINSTRING", "STRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}
)  # fmt: skip


def classify(module: str, name: str) -> str:
    """``dangerous``, ``safe`` or ``suspicious`` for one imported global."""
    if UNKNOWN in (module, name) or (module, name) in DANGEROUS_NAMES:
        return "dangerous"
    parts = module.split(".")
    if any(".".join(parts[: i + 1]) in DANGEROUS_MODULES for i in range(len(parts))):
        return "dangerous"
    if (module, name) in SAFE_NAMES or module in SAFE_MODULES:
        return "safe"
    # Storage classes and dtypes: torch.FloatStorage, torch.bfloat16, ...
    if module == "torch" and (name.endswith("Storage") or name in _TORCH_DTYPES):
        return "safe"
    return "suspicious"


_TORCH_DTYPES = frozenset(
    {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
     "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "half", "float",
     "double", "long", "int", "short"}
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


def _one_pickle(data: bytes, start: int, found: list[tuple[str, str]]) -> int:
    stream = io.BytesIO(data)
    stream.seek(start)
    values: list[object] = []  # approximation of the values a string/GET op pushes
    memo: dict[int, object] = {}
    end = len(data)
    for op, arg, pos in pickletools.genops(stream):
        opname = op.name
        if opname in _STRING_OPS:
            values.append(arg if isinstance(arg, str) else None)
        elif opname in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            found.append((module, name))
        elif opname == "STACK_GLOBAL":
            name_v = values.pop() if values else None
            module_v = values.pop() if values else None
            if isinstance(module_v, str) and isinstance(name_v, str):
                found.append((module_v, name_v))
            else:
                found.append((UNKNOWN, UNKNOWN))
        elif opname == "MEMOIZE":
            memo[len(memo)] = values[-1] if values else None
        elif opname in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = values[-1] if values else None
        elif opname in ("GET", "BINGET", "LONG_BINGET"):
            values.append(memo.get(int(arg)))
        elif opname == "STOP":
            assert pos is not None
            end = pos + 1
            break
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
