"""Load and validate rules/*.yaml.

Everything that can be checked before an audit is checked here, so a broken rule
fails at load with its file and the reason: the YAML, the fields (pydantic, unknown
keys refused), the CEL condition (compiled by cel-python), the message template
(compiled by Jinja2's sandbox), the examples (valid Measurements), duplicate ids.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import celpy
import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from auditor.errors import RuleError
from auditor.resources import resource_path, source_root
from auditor.schema import Measurements, Severity
from auditor.settings import get_settings

Scope = Literal["subject", "lineage", "triggers", "pickles"]
Confidence = Literal["low", "medium", "high"]

# Examples are partial Measurements merged onto this.
DEFAULT_EXAMPLE: dict[str, Any] = {
    "subject": {
        "repo_id": "alice/subject-model",
        "revision": "0" * 40,
        "base_repo_id": "base-org/base-model",
        "owner": "alice",
    },
}

_ID_PATTERN = re.compile(r"^[A-Z]{2,5}[0-9]{3}$")

# Plain-text messages: no HTML escaping (formatters escape for their own output);
# StrictUndefined so a misspelt field fails the rule's examples instead of rendering "".
_JINJA = SandboxedEnvironment(autoescape=False, undefined=jinja2.StrictUndefined)
_CEL = celpy.Environment()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleExamples(_Strict):
    fires: list[dict[str, Any]] = Field(default_factory=list)
    does_not_fire: list[dict[str, Any]] = Field(default_factory=list)


class RuleSpec(_Strict):
    """The YAML form of one rule."""

    id: str
    title: str
    severity: Severity
    confidence: Confidence = "medium"
    description: str
    scope: Scope = "subject"
    condition: str
    message: str
    remediation: str = ""
    references: list[str] = Field(default_factory=list)
    # Dotted paths into the measurements copied into a subject-scope finding's evidence.
    evidence: list[str] = Field(default_factory=list)
    examples: RuleExamples

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _ID_PATTERN.match(value):
            raise ValueError(f"rule id {value!r} must look like 'AUD101'")
        return value

    @field_validator("severity", mode="before")
    @classmethod
    def _lower_severity(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


@dataclass(frozen=True)
class Rule:
    """A loaded rule: its spec plus the compiled condition and message."""

    spec: RuleSpec
    source: Path
    program: Any = field(repr=False)  # celpy Runner
    template: jinja2.Template = field(repr=False)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def where(self) -> str:
        return _display(self.source)


def _display(path: Path) -> str:
    """``rules/x.yaml`` for shipped rules, the full path otherwise."""
    try:
        return str(path.resolve().relative_to(_repo_root()))
    except ValueError:
        return str(path)


def _repo_root() -> Path:
    return source_root()


def default_rules_dir() -> Path:
    return get_settings().rules_dir or resource_path("rules")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` onto ``base``: dicts merge recursively, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def example_measurements(partial: dict[str, Any]) -> Measurements:
    return Measurements.model_validate(deep_merge(DEFAULT_EXAMPLE, partial))


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(rule)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def compile_rule(data: Any, *, source: Path) -> Rule:
    """Validate and compile one rule mapping; RuleError names ``source`` and the reason."""
    where = _display(source)
    if not isinstance(data, dict):
        raise RuleError(f"{where}: a rule must be a mapping, got {type(data).__name__}")
    try:
        spec = RuleSpec.model_validate(data)
    except ValidationError as exc:
        rid = data.get("id", "?")
        raise RuleError(f"{where}: rule {rid}: {_format_validation(exc)}") from None
    try:
        program = _CEL.program(_CEL.compile(spec.condition))
    except celpy.CELParseError as exc:
        reason = " ".join(str(exc).split())
        raise RuleError(f"{where}: rule {spec.id}: invalid CEL condition: {reason}") from None
    try:
        template = _JINJA.from_string(spec.message)
    except jinja2.TemplateSyntaxError as exc:
        raise RuleError(
            f"{where}: rule {spec.id}: invalid message template (line {exc.lineno}): {exc.message}"
        ) from None
    for kind, examples in (
        ("fires", spec.examples.fires),
        ("does_not_fire", spec.examples.does_not_fire),
    ):
        for i, example in enumerate(examples):
            try:
                example_measurements(example)
            except ValidationError as exc:
                raise RuleError(
                    f"{where}: rule {spec.id}: examples.{kind}[{i}] is not valid "
                    f"Measurements: {_format_validation(exc)}"
                ) from None
    return Rule(spec=spec, source=source, program=program, template=template)


def load_rule_file(path: Path) -> list[Rule]:
    """One file holds one rule (a mapping) or several (a list of mappings)."""
    where = _display(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RuleError(f"{where}: invalid YAML: {' '.join(str(exc).split())}") from None
    except OSError as exc:
        raise RuleError(f"{where}: cannot read: {exc.strerror}") from None
    if data is None:
        raise RuleError(f"{where}: empty rule file")
    items = data if isinstance(data, list) else [data]
    return [compile_rule(item, source=path) for item in items]


def load_rules(paths: Path | Iterable[Path] | None = None) -> list[Rule]:
    """Load rules from a directory (every ``*.yaml``/``*.yml``), a file, or several.

    Default: ``AUDITOR_RULES_DIR`` or the shipped ``rules/`` folder. Rules come back
    sorted by id; a duplicate id anywhere raises RuleError naming both files.
    """
    if paths is None:
        paths = [default_rules_dir()]
    elif isinstance(paths, Path):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted([*p.glob("*.yaml"), *p.glob("*.yml")]))
        elif p.exists():
            files.append(p)
        else:
            raise RuleError(f"{_display(p)}: no such rule file or directory")
    try:
        key = tuple((str(f.resolve()), st.st_size, st.st_mtime_ns)
                    for f in files for st in [f.stat()])
    except OSError:
        key = None
    cached = _LOADED.get(key) if key is not None else None
    if cached is not None:
        return list(cached)
    rules = _load(files)
    if key is not None:
        if len(_LOADED) >= 16:
            _LOADED.clear()
        _LOADED[key] = tuple(rules)
    return rules


# Rule files as loaded (paths, sizes, mtimes) -> their compiled rules: every audit of a
# worker evaluates the same files, and parsing and compiling them took 0.7 s of a 1B first
# pass of 4.5 s. An edited file has another mtime and is loaded again.
_LOADED: dict[tuple[tuple[str, int, int], ...], tuple[Rule, ...]] = {}


def _load(files: list[Path]) -> list[Rule]:
    rules: list[Rule] = []
    seen: dict[str, Rule] = {}
    for f in files:
        for rule in load_rule_file(f):
            if rule.id in seen:
                raise RuleError(
                    f"{rule.where}: duplicate rule id {rule.id} (already in {seen[rule.id].where})"
                )
            seen[rule.id] = rule
            rules.append(rule)
    return sorted(rules, key=lambda r: r.id)
