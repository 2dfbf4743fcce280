"""Model-card parsing: the YAML front matter of README.md, treated as hostile input.

Cards are written by whoever uploads a model, so the parser caps sizes, refuses YAML
aliases (billion-laughs bombs expand into huge structures once serialised), only keeps
JSON-safe scalars/containers within a node budget, and never raises: anything odd
becomes a warning on an otherwise empty-ish ``CardInfo``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from auditor.bounded import loads_yaml, yaml_limits
from auditor.errors import AuditorError

MAX_CARD_BYTES = 1_000_000
MAX_FRONT_MATTER_BYTES = 256_000
MAX_NODES = 20_000
MAX_DEPTH = 20
MAX_STRING = 10_000
MAX_BASE_MODELS = 64

RELATIONS = ("finetune", "adapter", "merge", "quantized")
CardRelation = Literal["finetune", "adapter", "merge", "quantized"]

# Hub repo ids: optional namespace, then a name; letters, digits, '-', '_', '.';
# no '--' or '..' (the Hub rejects them), at most 96 chars per part.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID_RE = re.compile(rf"^(?:{_PART}/)?{_PART}$")
_FRONT_MATTER_RE = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


def is_repo_id(value: object) -> bool:
    """True for strings that look like a Hub model id (``org/name`` or a legacy ``name``)."""
    if not isinstance(value, str) or not _REPO_ID_RE.match(value):
        return False
    return "--" not in value and ".." not in value


class CardInfo(BaseModel):
    """What the auditor needs from a model card; ``data`` is the JSON-safe front matter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_models: list[str] = Field(default_factory=list)
    relation: CardRelation | None = None
    tags: list[str] = Field(default_factory=list)
    license: str | None = None
    pipeline_tag: str | None = None
    library_name: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)


class _Budget:
    def __init__(self) -> None:
        self.nodes = 0
        self.truncated = False


def _json_safe(value: Any, budget: _Budget, depth: int = 0) -> Any:
    """Copy ``value`` keeping only JSON types; drop what exceeds the depth/node budget."""
    budget.nodes += 1
    if budget.nodes > MAX_NODES or depth > MAX_DEPTH:
        budget.truncated = True
        return None
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            budget.truncated = True
            return value[:MAX_STRING]
        return value
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if budget.nodes > MAX_NODES:
                budget.truncated = True
                break
            out[str(key)[:MAX_STRING]] = _json_safe(item, budget, depth + 1)
        return out
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            if budget.nodes > MAX_NODES:
                budget.truncated = True
                break
            items.append(_json_safe(item, budget, depth + 1))
        return items
    # dates, bytes, sets...: keep a string form (YAML timestamps are common in cards)
    return str(value)[:MAX_STRING]


def _str_list(value: Any, field: str, warnings: list[str]) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        out = [v for v in value if isinstance(v, str)]
        if len(out) != len(value):
            warnings.append(f"{field}: non-string entries ignored")
        return out
    warnings.append(f"{field}: expected a string or a list, got {type(value).__name__}")
    return []


def _opt_str(value: Any, field: str, warnings: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value[:200]
    warnings.append(f"{field}: expected a string, got {type(value).__name__}")
    return None


def extract_front_matter(text: str) -> str | None:
    """The YAML between the leading ``---`` lines, or None when there is none."""
    match = _FRONT_MATTER_RE.match(text)
    return match.group(1) if match else None


def card_from_data(data: Any, *, warnings: list[str] | None = None) -> CardInfo:
    """Build a ``CardInfo`` from already-parsed card data (e.g. the Hub's ``cardData``)."""
    warns = list(warnings or [])
    if data is None:
        return CardInfo(warnings=warns)
    if not isinstance(data, dict):
        warns.append(f"card data is a {type(data).__name__}, not a mapping")
        return CardInfo(warnings=warns)
    budget = _Budget()
    safe = _json_safe(data, budget)
    if budget.truncated:
        warns.append("card data too large or too deep: truncated")

    # Linear de-duplication (a set beside the ordered list), capped: a 10,000-entry list
    # costs one pass, and only the first MAX_BASE_MODELS distinct ids are kept.
    bases: list[str] = []
    seen: set[str] = set()
    dropped = 0
    invalid = 0
    for base in _str_list(safe.get("base_model"), "base_model", warns):
        base = base.strip()
        if base in seen:
            continue
        if not is_repo_id(base):
            invalid += 1
            if invalid <= 10:
                warns.append(f"base_model: {base[:100]!r} is not a valid repo id")
            continue
        seen.add(base)
        if len(bases) < MAX_BASE_MODELS:
            bases.append(base)
        else:
            dropped += 1
    if dropped:
        warns.append(f"base_model: {len(bases) + dropped} entries, keeping the first "
                     f"{MAX_BASE_MODELS}")
    if invalid > 10:
        warns.append(f"base_model: {invalid} invalid repo ids in all")

    relation_raw = _opt_str(safe.get("base_model_relation"), "base_model_relation", warns)
    relation: CardRelation | None = None
    if relation_raw is not None:
        if relation_raw in RELATIONS:
            relation = relation_raw  # type: ignore[assignment]
        else:
            warns.append(f"base_model_relation: unknown value {relation_raw[:50]!r}")

    tags = [t for t in _str_list(safe.get("tags"), "tags", warns) if 0 < len(t) <= 200]
    license_value = _opt_str(safe.get("license"), "license", warns)
    return CardInfo(
        base_models=bases,
        relation=relation,
        tags=list(dict.fromkeys(tags)),
        license=license_value,
        pipeline_tag=_opt_str(safe.get("pipeline_tag"), "pipeline_tag", warns),
        library_name=_opt_str(safe.get("library_name"), "library_name", warns),
        data=safe,
        warnings=warns,
    )


def parse_card(text: str | bytes) -> CardInfo:
    """Parse a README.md; never raises, problems end up in ``CardInfo.warnings``."""
    warnings: list[str] = []
    if isinstance(text, bytes):
        text = text[: MAX_CARD_BYTES + 1].decode("utf-8", errors="replace")
    if len(text) > MAX_CARD_BYTES:
        warnings.append(f"card larger than {MAX_CARD_BYTES} characters: truncated")
        text = text[:MAX_CARD_BYTES]
    front = extract_front_matter(text)
    if front is None:
        return CardInfo(warnings=warnings)
    if len(front) > MAX_FRONT_MATTER_BYTES:
        warnings.append(f"front matter larger than {MAX_FRONT_MATTER_BYTES} characters: ignored")
        return CardInfo(warnings=warnings)
    try:
        data = loads_yaml(front, name="README.md front matter",
                          limits=yaml_limits(max_bytes=MAX_FRONT_MATTER_BYTES))
    except AuditorError as exc:
        warnings.append(f"malformed YAML front matter: {str(exc)[:200]}")
        return CardInfo(warnings=warnings)
    return card_from_data(data, warnings=warnings)


def infer_relation(card: CardInfo, *, has_adapter: bool) -> CardRelation | None:
    """The relation the Hub would show: declared, else adapter, else merge, else finetune."""
    if not card.base_models:
        return None
    if card.relation is not None:
        return card.relation
    if has_adapter:
        return "adapter"
    if len(card.base_models) > 1:
        return "merge"
    return "finetune"


def derive_tags(card: CardInfo, *, has_adapter: bool) -> list[str]:
    """Hub-style lineage tags: ``base_model:ORG/NAME`` and ``base_model:{relation}:ORG/NAME``."""
    relation = infer_relation(card, has_adapter=has_adapter)
    tags: list[str] = []
    for base in card.base_models:
        tags.append(f"base_model:{base}")
        tags.append(f"base_model:{relation}:{base}")
    return tags
