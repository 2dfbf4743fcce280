"""One bounded parser for every JSON / YAML file an uploader writes.

Model cards, config.json, generation_config.json, tokenizer files, mergekit_config.yml,
adapter_config.json, safetensors headers and shard indexes all come from whoever uploaded the
repo. Parsing them with the plain stdlib / PyYAML invites RecursionError (deep nesting),
multi-second int conversions and ``ValueError: overflow`` further down (20,000-digit
integers), non-JSON ``NaN`` that later poisons reports, and memory blow-ups (huge files).

Every reader goes through here instead: size, nesting depth and integer size are checked
against limits from the settings object, and any violation is an ``InputLimitExceeded`` (or a
``MalformedFile`` for plain syntax errors) naming the file, which callers record as a file
issue of that file while the rest of the audit goes on. Nothing here imports or executes
anything named in the input.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from auditor.errors import InputLimitExceeded, MalformedFile

__all__ = [
    "Limits",
    "check_nesting",
    "json_limits",
    "load_json_file",
    "load_yaml_file",
    "loads_json",
    "loads_yaml",
    "yaml_limits",
]


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_depth: int
    max_int_digits: int


def _settings(settings: Any | None) -> Any:
    if settings is not None:
        return settings
    from auditor.settings import get_settings

    return get_settings()


def json_limits(settings: Any | None = None, *, max_bytes: int | None = None) -> Limits:
    s = _settings(settings)
    return Limits(max_bytes=max_bytes or s.max_json_bytes, max_depth=s.max_nesting_depth,
                  max_int_digits=s.max_int_digits)


def yaml_limits(settings: Any | None = None, *, max_bytes: int | None = None) -> Limits:
    s = _settings(settings)
    return Limits(max_bytes=max_bytes or s.max_yaml_bytes, max_depth=s.max_nesting_depth,
                  max_int_digits=s.max_int_digits)


# ---------------------------------------------------------------------------- JSON
# A JSON string (escapes included), unrolled so the regex engine does not backtrack per char.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_DELETE_NON_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def check_nesting(raw: bytes, *, name: str, max_depth: int) -> None:
    """Refuse JSON nested deeper than ``max_depth`` before any recursive parser sees it.

    Strings are cut out first (tokenizer vocabularies hold "[[" and "{{" tokens), then only
    brackets are kept and the innermost pairs are removed one level per pass: all C-speed
    byte operations, so an 89 MB header costs a fraction of a second.
    """
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _DELETE_NON_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return
        shorter = _INNERMOST.sub(b"", brackets)
        if len(shorter) == len(brackets):
            raise MalformedFile(f"{name}: not valid JSON (unbalanced brackets)")
        brackets = shorter
    if brackets:
        raise InputLimitExceeded(f"{name}: nested deeper than {max_depth} levels")


def _int_parser(name: str, max_digits: int) -> Callable[[str], int]:
    def parse_int(text: str) -> int:
        if len(text.lstrip("-")) > max_digits:
            raise InputLimitExceeded(
                f"{name}: integer of {len(text.lstrip('-'))} digits (limit {max_digits})")
        return int(text)

    return parse_int


def _float_parser(name: str) -> Callable[[str], float]:
    def parse_float(text: str) -> float:
        if len(text) > 400:
            raise InputLimitExceeded(f"{name}: number literal of {len(text)} characters")
        value = float(text)
        if not math.isfinite(value):
            raise MalformedFile(f"{name}: number {text[:40]} is out of range")
        return value

    return parse_float


def _reject_constant(name: str) -> Callable[[str], Any]:
    def parse_constant(text: str) -> Any:
        # NaN / Infinity are not JSON; accepted, they end up in reports and databases.
        raise MalformedFile(f"{name}: {text} is not a JSON number")

    return parse_constant


def loads_json(
    data: bytes | str,
    *,
    name: str,
    limits: Limits | None = None,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """Parse JSON within ``limits``; raises ``MalformedFile`` / ``InputLimitExceeded``."""
    lim = limits or json_limits()
    raw = data.encode("utf-8", errors="surrogatepass") if isinstance(data, str) else data
    if len(raw) > lim.max_bytes:
        raise InputLimitExceeded(f"{name}: {len(raw)} bytes (limit {lim.max_bytes})")
    check_nesting(raw, name=name, max_depth=lim.max_depth)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedFile(f"{name}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=object_pairs_hook,
            parse_int=_int_parser(name, lim.max_int_digits),
            parse_float=_float_parser(name),
            parse_constant=_reject_constant(name),
        )
    except (MalformedFile, InputLimitExceeded):
        raise
    except RecursionError:
        # Backstop only: check_nesting caps the depth far below the recursion limit.
        raise InputLimitExceeded(f"{name}: nested too deeply") from None
    except ValueError as exc:
        raise MalformedFile(f"{name}: not valid JSON: {str(exc)[:200]}") from None


def _read_capped(path: Path, *, name: str, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputLimitExceeded(f"{name}: {size} bytes (limit {max_bytes})")
        with path.open("rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise MalformedFile(f"{name}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise InputLimitExceeded(f"{name}: more than {max_bytes} bytes")
    return raw


def load_json_file(
    path: Path | str, *, name: str | None = None, limits: Limits | None = None
) -> Any:
    """``loads_json`` of a file, reading at most the byte limit."""
    path = Path(path)
    label = name or path.name
    lim = limits or json_limits()
    return loads_json(_read_capped(path, name=label, max_bytes=lim.max_bytes),
                      name=label, limits=lim)


_CHECKED_MAX = 4096
_checked: OrderedDict[tuple[object, ...], None] = OrderedDict()
_checked_lock = threading.Lock()


def _content_key(path: Path) -> tuple[object, ...]:
    """Names the file's content: in the huggingface_hub cache a file is a link to
    ``blobs/<etag>``, the blob's name its content hash, so a tokenizer shared by a whole
    family is one key; any other file is its real path, size and mtime."""
    real = path.resolve()
    st = real.stat()
    if real.parent.name == "blobs":
        return ("blob", real.name, st.st_size)
    return (str(real), st.st_size, st.st_mtime_ns)


def check_json_file(path: Path | str, *, name: str | None = None,
                    limits: Limits | None = None) -> None:
    """Raise what ``load_json_file`` raises, or nothing. A content that passed before in
    this process is not parsed again: a worker audits a family's derivatives one after
    another, and a 128k-token vocabulary's tokenizer.json takes 0.4 s through the bounded
    parser. A file that fails is parsed (and fails) every time."""
    path = Path(path)
    lim = limits or json_limits()
    try:
        key: tuple[object, ...] | None = (*_content_key(path), lim)
    except OSError:
        key = None  # load_json_file says why
    with _checked_lock:
        if key is not None and key in _checked:
            _checked.move_to_end(key)
            return
    load_json_file(path, name=name, limits=lim)
    if key is not None:
        with _checked_lock:
            _checked[key] = None
            while len(_checked) > _CHECKED_MAX:
                _checked.popitem(last=False)


# ---------------------------------------------------------------------------- YAML
class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with no aliases (bombs), a depth cap and an integer-size cap."""

    max_depth = 64
    max_int_digits = 64
    label = "YAML"

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases are not allowed", event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                raise InputLimitExceeded(
                    f"{self.label}: nested deeper than {self.max_depth} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: Any) -> int:  # type: ignore[override]
        digits = str(node.value).lstrip("+-").replace("_", "")
        if len(digits) > self.max_int_digits + 2:  # +2: a 0x / 0o prefix
            raise InputLimitExceeded(
                f"{self.label}: integer of {len(digits)} digits (limit {self.max_int_digits})")
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def loads_yaml(text: str | bytes, *, name: str, limits: Limits | None = None) -> Any:
    """Safe-load YAML within ``limits``; raises ``MalformedFile`` / ``InputLimitExceeded``."""
    lim = limits or yaml_limits()
    if isinstance(text, bytes):
        if len(text) > lim.max_bytes:
            raise InputLimitExceeded(f"{name}: {len(text)} bytes (limit {lim.max_bytes})")
        text = text.decode("utf-8", errors="replace")
    if len(text) > lim.max_bytes:
        raise InputLimitExceeded(f"{name}: {len(text)} characters (limit {lim.max_bytes})")
    loader_cls = type("_Loader", (_BoundedLoader,), {
        "max_depth": lim.max_depth, "max_int_digits": lim.max_int_digits, "label": name,
    })
    try:
        return yaml.load(text, Loader=loader_cls)  # noqa: S506 - a SafeLoader subclass
    except InputLimitExceeded:
        raise
    except RecursionError:
        raise InputLimitExceeded(f"{name}: nested too deeply") from None
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MalformedFile(f"{name}: malformed YAML: {first[:200]}") from None


def load_yaml_file(
    path: Path | str, *, name: str | None = None, limits: Limits | None = None
) -> Any:
    path = Path(path)
    label = name or path.name
    lim = limits or yaml_limits()
    return loads_yaml(_read_capped(path, name=label, max_bytes=lim.max_bytes),
                      name=label, limits=lim)
