"""Audit one revision: the single path the CLI, the daemon and the demo all take.

hub (resolve, pin, fetch) -> weights (stream, align, task vectors) -> analysis (detectors
from the registry in ``auditor.detectors``) -> rules (findings) -> an ``AuditReport``.
Storing the outcome is the caller's business (``auditor.store``), so this stays usable
without a database.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from auditor import ANALYSIS_VERSION, __version__
from auditor.errors import AuditorError, MissingBase, WeightsError
from auditor.exitcodes import ExitCode
from auditor.hub.client import HubClient, ResolvedRepo
from auditor.schema import AuditReport, BackdoorInfo, FileIssue, Measurements, SubjectRef
from auditor.settings import Settings, get_settings
from auditor.weights.inventory import FileInventory, classify_files

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class HomologueRef:
    """A known homologue of the subject (same base), as the store keeps it: no download."""

    repo_id: str
    revision: str | None
    fingerprint: Any  # auditor.analysis.fingerprint.Fingerprint
    backdoor: BackdoorInfo | None = None
    created_at: datetime | None = None  # upload time: the oldest of a clone group is original


@dataclass(frozen=True)
class AuditOutcome:
    report: AuditReport
    fingerprint: Any | None  # auditor.analysis.fingerprint.Fingerprint
    resolved: ResolvedRepo
    exit_code: ExitCode


@dataclass
class OpenModel:
    """A resolved repo with its weight files on local disk (downloaded, pinned)."""

    resolved: ResolvedRepo
    inventory: FileInventory
    files: dict[str, Path]
    config: dict[str, Any] | None

    @property
    def folder(self) -> Path:
        """A folder holding config.json, tokenizer and weights (a local repo or a snapshot)."""
        any_file = next(iter(self.files.values()))
        return self.resolved.local_dir or any_file.parent


@dataclass
class AuditContext:
    """What detectors read and write during one audit (mutable on purpose: it is a builder)."""

    settings: Settings
    client: HubClient
    subject: OpenModel
    base: OpenModel | None
    candidates: dict[str, OpenModel]
    homologues: dict[str, HomologueRef]
    declared_parents: list[str]
    progress: Progress
    values: dict[str, Any] = field(default_factory=dict)  # Measurements fields, by name
    state: dict[str, Any] = field(default_factory=dict)  # shared between detectors
    file_issues: list[FileIssue] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


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
    config = None
    if "config.json" in files:
        try:
            loaded = json.loads(files["config.json"].read_text(encoding="utf-8"))
            config = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError, UnicodeDecodeError):
            config = None
    return OpenModel(resolved=resolved, inventory=inv, files=files, config=config)


def _choose_base(
    client: HubClient, subject: ResolvedRepo, base: str | None
) -> tuple[str | None, list[str]]:
    """The base to subtract and the parents the card declares.

    A merge card lists its parents in ``base_model``; their own common base is the base.
    """
    declared = list(subject.card.base_models)
    if base:
        return base, [d for d in declared if d != base]
    if not declared:
        return None, []
    if len(declared) == 1 and subject.card.relation != "merge":
        return declared[0], []
    counts: dict[str, int] = {}
    for parent in declared:
        try:
            parent_card = client.resolve(parent).card
        except AuditorError as exc:
            log.warning("declared parent %s not resolvable: %s", parent, exc)
            continue
        for b in parent_card.base_models[:1] or [parent]:
            counts[b] = counts.get(b, 0) + 1
    if not counts:
        return declared[0], declared[1:]
    chosen = max(counts, key=lambda k: counts[k])
    return chosen, [d for d in declared if d != chosen]


def audit_revision(
    subject: str,
    *,
    revision: str | None = None,
    base: str | None = None,
    against: Sequence[str] = (),
    homologues: Mapping[str, HomologueRef] | None = None,
    settings: Settings | None = None,
    client: HubClient | None = None,
    progress: Progress | None = None,
    detectors: Sequence[str] | None = None,
    authorizations: Sequence[Any] = (),
) -> AuditOutcome:
    """Audit one pinned revision of ``subject`` (a Hub repo id or a local folder).

    ``against`` are candidates to download and compare; ``homologues`` are candidates
    already fingerprinted (the daemon passes the store's). ``authorizations`` (owners'
    grants, ``auditor.rules.authz.AuthorizationLike``) mark the findings they cover as
    authorized; saving to the store re-applies the store's own. Raises ``AuditorError``
    subclasses for what makes an audit impossible (missing repo, gated, no base).
    """
    from auditor.detectors import DETECTORS, run_detectors
    from auditor.rules.engine import evaluate
    from auditor.rules.loader import load_rules

    settings = settings or get_settings()
    client = client or HubClient.from_settings(settings)
    say = progress or (lambda _msg: None)
    started = time.perf_counter()

    say(f"resolving {subject}")
    resolved = client.resolve(subject, revision=revision)
    inventory = classify_files(resolved.files)
    subject_model = OpenModel(resolved=resolved, inventory=inventory, files={}, config=None)
    base_spec, declared_parents = _choose_base(client, resolved, base)

    ctx = AuditContext(
        settings=settings,
        client=client,
        subject=subject_model,
        base=None,
        candidates={},
        homologues=dict(homologues or {}),
        declared_parents=declared_parents,
        progress=say,
    )
    if inventory.has_weights:
        say(f"downloading {resolved.repo_id}@{resolved.revision[:10]}")
        ctx.subject = fetch_model(client, resolved)
        if base_spec is None:
            raise MissingBase(
                f"{resolved.repo_id}: no --base given and the model card declares no base_model"
            )
        say(f"downloading base {base_spec}")
        try:
            ctx.base = fetch_model(client, client.resolve(base_spec))
        except AuditorError as exc:
            # Name the base, where it came from and the way out, not just the HTTP error.
            source = "--base" if base else "the model card's base_model"
            raise type(exc)(
                f"base model {base_spec} (from {source}) could not be fetched from "
                f"{client.endpoint}: {exc}; pass --base ORG/NAME (or a local folder)"
            ) from exc
        for spec in against:
            if spec in (subject, base_spec):
                continue
            try:
                cand = client.resolve(spec)
                if cand.repo_id in (resolved.repo_id, ctx.base.resolved.repo_id):
                    continue
                say(f"downloading candidate {cand.repo_id}")
                ctx.candidates[cand.repo_id] = fetch_model(client, cand)
            except (WeightsError, AuditorError) as exc:
                ctx.errors.append(f"candidate {spec}: {exc}")

    names = list(detectors) if detectors is not None else list(DETECTORS)
    try:
        run_detectors(ctx, names)
    finally:
        for source in ctx.state.pop("closers", []):
            source.close()

    sub_ref = SubjectRef(
        repo_id=resolved.repo_id,
        revision=resolved.revision,
        base_repo_id=ctx.base.resolved.repo_id if ctx.base else None,
        base_revision=ctx.base.resolved.revision if ctx.base else None,
        declared_base_models=list(resolved.card.base_models),
        declared_relation=resolved.card.relation,
        owner=resolved.owner or resolved.repo_id.split("/", 1)[0],
    )
    measurements = Measurements(
        subject=sub_ref,
        file_issues=ctx.file_issues,
        has_safetensors=bool(inventory.safetensors) or inventory.has_adapter,
        weights_analyzed=bool(ctx.state.get("weights_analyzed")),
        declared_mergekit_config=resolved.mergekit_config,
        **ctx.values,
    )
    if measurements.weights_analyzed:
        from auditor.analysis.mergekit_check import check_mergekit

        # The declared recipe against the measured one: parents, method, weights.
        measurements = measurements.model_copy(update={"mergekit": check_mergekit(
            resolved.mergekit_config, lineage=measurements.lineage, merge=measurements.merge,
            base_repo=sub_ref.base_repo_id)})
    rules = load_rules(settings.rules_dir)
    findings = evaluate(rules, measurements, authorizations=authorizations)
    ctx.timings["total"] = time.perf_counter() - started
    report = AuditReport(
        tool_version=__version__,
        analysis_version=ANALYSIS_VERSION,
        subject=sub_ref,
        lineage=measurements.lineage,
        merge=measurements.merge,
        backdoor=measurements.backdoor,
        protection=measurements.protection,
        findings=findings,
        barriers=measurements.barriers,
        pickles=measurements.pickles,
        file_issues=ctx.file_issues,
        errors=ctx.errors,
        timings={k: round(v, 4) for k, v in ctx.timings.items()},
        mergekit=measurements.mergekit,
    )
    return AuditOutcome(
        report=report,
        fingerprint=ctx.state.get("fingerprint"),
        resolved=resolved,
        exit_code=exit_code_for(report, scanned=inventory.has_weights or bool(inventory.pickles)),
    )


def exit_code_for(report: AuditReport, *, scanned: bool) -> ExitCode:
    if report.active_findings:
        return ExitCode.FINDINGS
    if not scanned:
        return ExitCode.NOTHING_SCANNED
    if report.errors:
        return ExitCode.ERROR
    return ExitCode.CLEAN


@contextlib.contextmanager
def timed(ctx: AuditContext, name: str):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    try:
        yield
    finally:
        ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - t0
