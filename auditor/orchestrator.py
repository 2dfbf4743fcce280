"""Audit one revision: the single path the CLI, the daemon and the demo all take.

hub (resolve, pin, fetch) -> weights (stream, align, task vectors) -> analysis (the
detector stages of ``auditor.detectors.PIPELINE``) -> rules (findings) -> an
``AuditReport``.
Storing the outcome is the caller's business (``auditor.store``), so this stays usable
without a database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor import ANALYSIS_VERSION, __version__
from auditor.detectors import PIPELINE
from auditor.detectors.base import run_stages, select_stages
from auditor.detectors.context import (
    AuditContext,
    HomologueRef,
    OpenModel,
    Progress,
    fetch_model,
)
from auditor.detectors.weights import SubjectWeights
from auditor.errors import (
    AuditorError,
    GatedRepo,
    MissingBase,
    RateLimited,
    TransientHubError,
    WeightsError,
)
from auditor.exitcodes import ExitCode
from auditor.hub.client import HubClient, ResolvedRepo
from auditor.schema import AuditReport, FileIssue, Measurements, SubjectRef
from auditor.settings import Settings, get_settings
from auditor.weights.inventory import classify_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditOutcome:
    report: AuditReport
    fingerprint: Any | None  # auditor.analysis.fingerprint.Fingerprint
    resolved: ResolvedRepo
    exit_code: ExitCode


MAX_PARENTS_RESOLVED = 8


def _choose_base(
    client: HubClient, subject: ResolvedRepo, base: str | None
) -> tuple[str | None, list[str]]:
    """The base to subtract and the parents the card declares.

    A merge card lists its parents in ``base_model``; their own common base is the base.
    """
    # A card naming the repo itself is never audited against itself (see declared_cycle).
    declared = [d for d in subject.card.base_models if d != subject.repo_id]
    if base:
        return base, [d for d in declared if d != base]
    if not declared:
        return None, []
    if len(declared) == 1 and subject.card.relation != "merge":
        return declared[0], []
    counts: dict[str, int] = {}
    # Each parent costs a Hub call: a card listing 64 "parents" must not cost 64 of them.
    for parent in declared[:MAX_PARENTS_RESOLVED]:
        try:
            parent_card = client.resolve_related(parent, near=subject).card
        except AuditorError as exc:
            log.warning("declared parent %s not resolvable: %s", parent, exc)
            continue
        for b in parent_card.base_models[:1] or [parent]:
            if b != subject.repo_id:  # a parent declaring the subject: a cycle, not a base
                counts[b] = counts.get(b, 0) + 1
    if not counts:
        return declared[0], declared[1:]
    chosen = max(counts, key=lambda k: counts[k])
    return chosen, [d for d in declared if d != chosen]


def _open_cache(settings: Settings) -> Any:
    if not settings.fingerprint_cache:
        return None
    from auditor.store.fpcache import FingerprintCache

    return FingerprintCache(settings)


def _add_stored_homologues(ctx: AuditContext, cache: Any, base_key: str, limit: int) -> None:
    """The cached homologues of the same base (one indexed query), by fingerprint only."""
    exclude = {ctx.subject.resolved.revision}
    exclude |= {c.resolved.revision for c in ctx.candidates.values()}
    taken = {ctx.subject.resolved.repo_id, *ctx.candidates}
    for entry in cache.homologues(base_key, exclude=exclude, limit=limit):
        if entry.repo_id in taken or entry.repo_id in ctx.homologues:
            continue
        local = entry.meta.get("local_dir")
        if local and Path(local).is_dir():
            # a local folder still holding the cached content joins as a candidate: its
            # fingerprint is a cache hit and its weights are at hand for the checks
            try:
                resolved = ctx.client.resolve(local)
            except AuditorError:
                resolved = None
            if resolved is not None and resolved.revision == entry.content_key:
                ctx.candidates[resolved.repo_id] = fetch_model(ctx.client, resolved)
                taken.add(resolved.repo_id)
                continue
        ctx.homologues[entry.repo_id] = HomologueRef(
            repo_id=entry.repo_id, revision=entry.content_key, fingerprint=entry.fingerprint)


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
    previous: Mapping[str, Any] | None = None,
    local: bool | None = None,
    authorizations: Sequence[Any] = (),
    defer_behaviour: bool = False,
) -> AuditOutcome:
    """Audit one pinned revision of ``subject`` (a Hub repo id or a local folder).

    ``previous`` (the daemon's earlier report of this same revision) makes the audit an
    incremental update: only the weight stages run (fingerprints come from the cache, so
    no weight is read and nothing is re-aligned), lineage and the rules are re-evaluated
    with the new comparison set, and the behavioural results are carried over.

    ``against`` are candidates to download and compare; ``homologues`` are candidates
    already fingerprinted (the daemon passes the store's). ``authorizations`` (owners'
    grants, ``auditor.rules.authz.AuthorizationLike``) mark the findings they cover as
    authorized; saving to the store re-applies the store's own. Raises ``AuditorError``
    subclasses for what makes an audit impossible (missing repo, gated, no base).
    ``local``: None reads a path-like spec (``./x``, absolute) as a folder; the daemon passes
    False so a crawled repo id is never resolved on local disk.
    ``defer_behaviour`` (the daemon's first pass): where ``behaviour_deferred`` says so, run
    only the weight stages and report the behavioural checks as pending (coverage
    ``behaviour_deferred``); the caller queues the second pass.
    """
    from auditor.rules.engine import evaluate
    from auditor.rules.loader import load_rules

    settings = settings or get_settings()
    client = client or HubClient.from_settings(settings)
    say = progress or (lambda _msg: None)
    started = time.perf_counter()

    say(f"resolving {subject}")
    resolved = client.resolve(subject, revision=revision, local=local)
    inventory = classify_files(resolved.files)
    subject_model = OpenModel(resolved=resolved, inventory=inventory, files={}, config=None)
    base_spec, declared_parents = _choose_base(client, resolved, base)
    cycle = declared_cycle(resolved)

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
    ctx.file_issues += [FileIssue(path=p, kind="malformed", message=m)
                        for p, m in resolved.file_issues]
    if inventory.has_weights:
        from auditor.preload import preload

        preload()  # before any lazy transformers name is touched, whatever thread we are
        say(f"downloading {resolved.repo_id}@{resolved.revision[:10]}")
        ctx.subject = fetch_model(client, resolved)
        ctx.file_issues += ctx.subject.issues
        if base_spec is None:
            why = (" (it names only itself)" if cycle else "")
            _no_base(ctx, inventory.pickles, MissingBase(
                f"{resolved.repo_id}: no --base given and the model card declares no "
                f"base_model{why}"
            ))
        else:
            say(f"downloading base {base_spec}")
            try:
                ctx.base = fetch_model(client, client.resolve_related(base_spec, near=resolved))
            except (GatedRepo, RateLimited, TransientHubError):
                raise  # the daemon skips or retries the whole audit
            except AuditorError as exc:
                # Name the base, where it came from and the way out, not just the HTTP error.
                source = "--base" if base else "the model card's base_model"
                _no_base(ctx, inventory.pickles, type(exc)(
                    f"base model {base_spec} (from {source}) could not be fetched from "
                    f"{client.endpoint}: {exc}; pass --base ORG/NAME (or a local folder)"
                ))
        if ctx.base is not None and resolved.repo_id in ctx.base.resolved.card.base_models:
            cycle = cycle or [resolved.repo_id, ctx.base.resolved.repo_id, resolved.repo_id]
        cache = _open_cache(settings) if ctx.base is not None else None
        ctx.fp_cache = cache
        base_key = ctx.base.resolved.revision if ctx.base is not None else ""
        for spec in against if ctx.base is not None else ():
            if spec in (subject, base_spec) or ctx.base is None:
                continue
            try:
                cand = client.resolve_related(spec, near=resolved)
                if cand.repo_id in (resolved.repo_id, ctx.base.resolved.repo_id):
                    continue
                # a candidate whose fingerprint is cached is not downloaded again (local
                # folders are read in place, so their weights stay at hand)
                cached = cache is not None and cache.has(cand.revision, base_key)
                say(f"downloading candidate {cand.repo_id}")
                ctx.candidates[cand.repo_id] = fetch_model(
                    client, cand, weights=not cached or cand.local_dir is not None)
            except (WeightsError, AuditorError) as exc:
                ctx.add_error(f"candidate {spec}: {exc}", kind=type(exc).__name__)
        if (not homologues and ctx.base is not None and ctx.fp_cache is not None
                and settings.compare_stored):
            _add_stored_homologues(ctx, ctx.fp_cache, ctx.base.resolved.revision,
                                   settings.max_stored_homologues)

    if previous is not None and detectors is None:
        detectors = INCREMENTAL_STAGES
    stages = select_stages(PIPELINE, list(detectors) if detectors is not None else None)
    from auditor import orchestrator_cache as bcache

    # the same models and settings measured before: the behavioural results are reused
    bkey = bcache.behaviour_key(ctx) if detectors is None and previous is None else None
    reused = bcache.lookup(ctx, bkey)
    if reused is not None:
        stages = [s for s in stages if s.name not in bcache.BEHAVIOUR_STAGES]
    deferred = (defer_behaviour and reused is None and detectors is None
                and previous is None and behaviour_deferred(ctx))
    if deferred:
        stages = [s for s in stages if s.name not in bcache.BEHAVIOUR_STAGES]
        ctx.add_error(
            "behavioural checks (barriers, equivalence, protection, backdoor) deferred to a "
            f"second pass: a {_model_bytes(ctx) / 1e9:.1f} GB model on the CPU; it is queued "
            "behind the weight analyses" + (" on the gpu queue" if settings.gpu_queue else ""),
            kind="Deferred", detector="behaviour")
    try:
        run_stages(ctx, stages)
        if reused is None:
            bcache.store(ctx, bkey)
    finally:
        for source in ctx.open_sources:
            source.close()
        ctx.open_sources.clear()
    measured: dict[str, Any] = {}
    for result in ctx.results():  # in run order: a later stage refines an earlier field
        measured.update(result.measurements())
    if reused is not None:
        measured = bcache.apply_cached(measured, reused)
    subject_weights = ctx.find(SubjectWeights)
    if previous is not None:
        measured = _carry_over(measured, previous)

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
        weights_analyzed=subject_weights is not None,
        declared_mergekit_config=resolved.mergekit_config,
        declared_cycle=cycle,
        **measured,
    )
    if measurements.weights_analyzed:
        from auditor.analysis.mergekit_check import check_mergekit

        # The declared recipe against the measured one: parents, method, weights.
        measurements = measurements.model_copy(update={"mergekit": check_mergekit(
            resolved.mergekit_config, lineage=measurements.lineage, merge=measurements.merge,
            base_repo=sub_ref.base_repo_id)})
    rules = load_rules(settings.rules_dir)
    rule_errors: list[str] = []
    findings = evaluate(rules, measurements, authorizations=authorizations,
                        errors=rule_errors)
    for message in rule_errors:  # a rule that failed to evaluate: the audit is incomplete
        ctx.add_error(message, kind="RuleError", detector="rules")
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
        provenance=measurements.provenance,
        pickles=measurements.pickles,
        file_issues=ctx.file_issues,
        errors=ctx.errors,
        skipped=ctx.skipped,
        timings={k: round(v, 4) for k, v in ctx.timings.items()},
        coverage=_coverage(ctx, measurements.lineage, analysed=subject_weights is not None)
        | ({"incremental": 1} if previous is not None else {})
        | ({"behaviour_cached": 1} if reused is not None else {})
        | ({"behaviour_deferred": 1} if deferred else {}),
        function_equivalent_to=measurements.function_equivalent_to,
        mergekit=measurements.mergekit,
    )
    return AuditOutcome(
        report=report,
        fingerprint=subject_weights.weights.fingerprint if subject_weights else None,
        resolved=resolved,
        exit_code=exit_code_for(report, scanned=inventory.has_weights or bool(inventory.pickles)),
    )


# What an incremental update runs: the fingerprint (a cache hit), lineage and the rules.
INCREMENTAL_STAGES = ("pickles", "weights", "lineage")


def _model_bytes(ctx: AuditContext) -> int:
    """Bytes of the full weights the behavioural checks would run: the subject's, or its
    base's for an adapter (base + delta is a model of the base's size)."""
    def size(model: OpenModel | None) -> int:
        if model is None:
            return 0
        return sum(n for p, n in model.resolved.files.items()
                   if p.endswith(".safetensors") and not p.startswith("adapter_") and n > 0)

    return max(size(ctx.subject), size(ctx.base))


def behaviour_deferred(ctx: AuditContext) -> bool:
    """Whether a daemon's first pass leaves the behavioural checks to a second one: on a
    CPU device, always when a gpu queue takes them, else for models above
    ``Settings.defer_behaviour_bytes``."""
    settings = ctx.settings
    if ctx.base is None or settings.defer_behaviour_bytes <= 0:
        return False
    from auditor.analysis.compute import resolve_device

    try:
        on_cpu = resolve_device(settings.device).type == "cpu"
    except Exception:  # a bad AUDITOR_DEVICE: the behavioural stages report it themselves
        return False
    return on_cpu and (settings.gpu_queue or _model_bytes(ctx) > settings.defer_behaviour_bytes)


def _carry_over(measured: dict[str, Any], previous: Mapping[str, Any]) -> dict[str, Any]:
    """The previous report's behavioural results where this run did not measure them;
    barriers stay on the lineage entries of models compared before."""
    from auditor.schema import AuditReport as _Report

    try:
        prev = _Report.model_validate(previous)
    except ValueError:
        return measured
    out = dict(measured)
    for name in ("backdoor", "protection", "barriers"):
        if name not in out:
            out[name] = getattr(prev, name)
    if "function_equivalent_to" not in out and "function_equivalent_to" in previous:
        out["function_equivalent_to"] = list(previous["function_equivalent_to"] or [])
    old = {e.repo_id: e.barrier for e in prev.lineage if e.barrier is not None}
    if "lineage" in out and old:
        out["lineage"] = [e.model_copy(update={"barrier": old[e.repo_id]})
                          if e.barrier is None and e.repo_id in old else e
                          for e in out["lineage"]]
    return out


def _coverage(ctx: AuditContext, lineage: Sequence[Any], *, analysed: bool) -> dict[str, int]:
    if not analysed:
        return {}
    return {"candidates_compared": len({e.repo_id for e in lineage}),
            "stored_homologues": len(ctx.homologues),
            "fingerprints_cached": ctx.cache_hits}


def _no_base(ctx: AuditContext, pickles: Sequence[str], error: AuditorError) -> None:
    """No usable base: with pickle files to scan, the audit goes on without the weights
    analysis (their findings are kept; the error makes it incomplete); with nothing else
    to check, the error is the answer."""
    if not pickles:
        raise error
    ctx.add_error(str(error), kind=type(error).__name__)


def declared_cycle(resolved: ResolvedRepo) -> list[str]:
    """The subject's card naming the subject itself as a base: ``[repo, repo]``, else []."""
    if resolved.repo_id in resolved.card.base_models:
        return [resolved.repo_id, resolved.repo_id]
    return []


def exit_code_for(report: AuditReport, *, scanned: bool) -> ExitCode:
    if report.active_findings:
        return ExitCode.FINDINGS
    if not scanned:
        return ExitCode.NOTHING_SCANNED
    if report.errors:
        return ExitCode.ERROR
    return ExitCode.CLEAN


def incomplete(report: AuditReport) -> bool:
    """Weights analysed but compared against nothing: "no findings" would not be clean."""
    return report.coverage.get("candidates_compared", 1) == 0
