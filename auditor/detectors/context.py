"""What one audit's detectors share: the opened models and typed result slots.

A detector reads its inputs with ``ctx.get(SomeResult)`` and publishes its output with
``ctx.provide(OtherResult(...))``. Results are frozen dataclasses, one type per slot,
declared by the detectors in ``requires`` / ``provides`` (see ``auditor.detectors``), so
what a detector needs is in its signature, not in string keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from auditor.bounded import check_json_file, load_json_file
from auditor.errors import AuditorError
from auditor.hub.client import HubClient, ResolvedRepo
from auditor.schema import BackdoorInfo, CheckError, FileIssue, SkippedCheck
from auditor.settings import Settings
from auditor.weights.inventory import FileInventory, classify_files

if TYPE_CHECKING:
    from auditor.analysis.fingerprint import Fingerprint
    from auditor.weights.base import TensorSource

Progress = Callable[[str], None]


# The cache key under which a base model's own weight fingerprint is kept (no base of its own).
BASE_WEIGHTS_KEY = ""

@dataclass(frozen=True)
class StageResult:
    """Base of every typed result a detector provides (subclasses are frozen dataclasses).

    ``measurements`` names the ``Measurements`` fields this result fills for the rules
    and the report; results are applied in run order, so a later stage may refine an
    earlier one's field (the barrier stage adds barriers to the lineage entries).
    """

    def measurements(self) -> Mapping[str, Any]:
        return {}


R = TypeVar("R", bound=StageResult)


@dataclass(frozen=True)
class HomologueRef:
    """A known homologue of the subject (same base), as the store keeps it: no download."""

    repo_id: str
    revision: str | None
    fingerprint: Fingerprint
    backdoor: BackdoorInfo | None = None
    created_at: datetime | None = None  # upload time: the oldest of a clone group is original


@dataclass
class OpenModel:
    """A resolved repo with its weight files on local disk (downloaded, pinned)."""

    resolved: ResolvedRepo
    inventory: FileInventory
    files: dict[str, Path]
    config: dict[str, Any] | None
    issues: list[FileIssue] = field(default_factory=list)  # side files refused (bounded)

    @property
    def folder(self) -> Path:
        """A folder holding config.json, tokenizer and weights (a local repo or a snapshot)."""
        any_file = next(iter(self.files.values()))
        return self.resolved.local_dir or any_file.parent


@dataclass
class AuditContext:
    """One audit's inputs, typed result slots and outcome lists (mutable: it is a builder)."""

    settings: Settings
    client: HubClient
    subject: OpenModel
    base: OpenModel | None
    candidates: dict[str, OpenModel]
    homologues: dict[str, HomologueRef]
    declared_parents: list[str]
    progress: Progress
    file_issues: list[FileIssue] = field(default_factory=list)
    errors: list[CheckError] = field(default_factory=list)
    skipped: list[SkippedCheck] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # Weight sources opened during the audit; the orchestrator closes them at the end.
    open_sources: list[TensorSource] = field(default_factory=list)
    # The content-keyed fingerprint cache (auditor.store.fpcache, handed in by the
    # orchestrator: detectors never import the store), None when disabled,
    # and how many fingerprints it served in this audit.
    fp_cache: Any = None
    cache_hits: int = 0
    _results: dict[type[StageResult], StageResult] = field(default_factory=dict)
    _providing: frozenset[type[StageResult]] = frozenset()
    _stage: str = "audit"  # the running detector, named in errors and skips

    def get(self, kind: type[R]) -> R:
        """The result of type ``kind`` (a declared requirement: present when we run)."""
        value = self._results[kind]
        assert isinstance(value, kind)
        return value

    def find(self, kind: type[R]) -> R | None:
        """The result of type ``kind``, or None when its stage did not run or provide it."""
        value = self._results.get(kind)
        return value if isinstance(value, kind) else None

    def has(self, kind: type[StageResult]) -> bool:
        return kind in self._results

    def provide(self, result: StageResult) -> None:
        """Publish a result; only the types the running stage declares are accepted."""
        kind = type(result)
        if kind not in self._providing:
            raise TypeError(f"{kind.__name__} is not declared in the running stage's provides")
        if kind in self._results:
            raise TypeError(f"{kind.__name__} provided twice")
        self._results[kind] = result

    def add_error(self, message: str, *, kind: str, detector: str | None = None) -> None:
        """Record a failed check (the audit becomes incomplete); ``detector``: the running one."""
        self.errors.append(CheckError(detector=detector or self._stage, kind=kind,
                                      message=message))

    def skip(self, reason: str, *, detector: str | None = None) -> None:
        """Record a check that does not apply to this model (not an error)."""
        self.skipped.append(SkippedCheck(detector=detector or self._stage, reason=reason))

    def results(self) -> list[StageResult]:
        """Every provided result, in the order they were provided."""
        return list(self._results.values())

    @contextmanager
    def running(self, name: str, provides: tuple[type[StageResult], ...]) -> Iterator[None]:
        """While stage ``name`` runs, accept exactly its declared result types."""
        self._stage, self._providing = name, frozenset(provides)
        try:
            yield
        finally:
            self._stage, self._providing = "audit", frozenset()


_WEIGHT_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "generation_config.json")


def fetch_model(client: HubClient, resolved: ResolvedRepo, *, weights: bool = True) -> OpenModel:
    inv = classify_files(resolved.files)
    wanted: list[str] = []
    if weights:
        if inv.shard_index:
            wanted.append(inv.shard_index)
            wanted += [f for f in inv.safetensors]
        elif "model.safetensors" in inv.safetensors:
            wanted.append("model.safetensors")
        else:
            wanted += list(inv.safetensors)
        if inv.has_adapter:
            wanted += [inv.adapter_config or "", inv.adapter_weights or ""]
    wanted += [f for f in _WEIGHT_SIDE_FILES if f in resolved.files]
    files = {name: client.fetch(resolved, name) for name in dict.fromkeys(wanted) if name}
    issues: list[FileIssue] = []
    # Index and adapter config are checked by their own strict readers (weights errors).
    side = {n: p for n, p in files.items() if n in _WEIGHT_SIDE_FILES}
    _checked_side_files(side, issues)
    files = {n: p for n, p in files.items() if n not in _WEIGHT_SIDE_FILES or n in side}
    config = None
    if "config.json" in files:
        try:
            loaded = load_json_file(files["config.json"], name="config.json")
            config = loaded if isinstance(loaded, dict) else None
        except AuditorError:
            config = None
    return OpenModel(resolved=resolved, inventory=inv, files=files, config=config,
                     issues=issues)


def _checked_side_files(files: dict[str, Path], issues: list[FileIssue]) -> None:
    """Parse each JSON side file within the bounded parser's limits; a file that breaks one
    is dropped (no later reader, transformers included, ever sees it) with a file issue."""
    for name in [n for n in files if n.endswith(".json")]:
        try:
            check_json_file(files[name], name=name)
        except AuditorError as exc:
            issues.append(FileIssue(path=name, kind="malformed", message=str(exc)))
            del files[name]
