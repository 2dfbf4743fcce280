"""Record an orchestrator outcome in the store (on-demand audits and the daemon alike)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from auditor import ANALYSIS_VERSION
from auditor.store import catalog, queries, queue
from auditor.store.db import make_engine, session_factory, upgrade_database
from auditor.weights.inventory import classify_files

if TYPE_CHECKING:
    from auditor.orchestrator import AuditOutcome
    from auditor.settings import Settings


def save_result(
    session: Session,
    *,
    audit_id: int,
    revision_id: int,
    report: Any,
    fingerprint: Any | None,
    analysis_version: str = ANALYSIS_VERSION,
    worker_id: str | None = None,
) -> None:
    """Fingerprint first, then the audit: a crash in between re-runs the audit, and the
    fingerprint row is an upsert, so nothing is duplicated."""
    if fingerprint is not None:
        catalog.save_fingerprint(
            session,
            revision_id=revision_id,
            analysis_version=analysis_version,
            data=fingerprint.to_bytes(),
            error_bound=fingerprint.error_bound,
        )
    # The owners' current grants apply to every stored result, whoever ran the audit.
    from auditor.store.authorizations import authorize_report

    report = authorize_report(session, report)
    queue.complete_audit(session, audit_id=audit_id, report=report, worker_id=worker_id)


def record_outcome(settings: Settings, outcome: AuditOutcome) -> int:
    """Store an on-demand audit as a done audit of its revision; returns the audit id.

    Re-recording the same revision under the same analysis version and configuration
    replaces the stored result (complete_audit replaces comparisons and findings).
    """
    from auditor.settings import analysis_config_hash

    url = settings.resolved_database_url
    if url.startswith("sqlite:///"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(url)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            res = outcome.resolved
            catalog.upsert_repo(
                session,
                repo_id=res.repo_id,
                owner=res.owner,
                declared_base_models=list(res.card.base_models),
                declared_relation=res.card.relation,
                gated=bool(res.gated),
                private=bool(res.private),
                # The base it was audited against: later audits of that family compare
                # with it from its stored fingerprint, without a download.
                family_base=outcome.report.subject.base_repo_id,
            )
            inv = classify_files(res.files)
            formats = ["safetensors"] if inv.safetensors else []
            formats += ["peft"] if inv.has_adapter else []
            formats += ["pickle"] if inv.pickles else []
            rev = catalog.upsert_revision(
                session,
                repo_id=res.repo_id,
                sha=res.revision,
                created_at=res.created_at,
                files=[{"path": p, "size": s} for p, s in sorted(res.files.items())],
                formats=formats,
            )
            config_hash = analysis_config_hash(settings)
            audit_id = queue.queue_audit(
                session, revision_id=rev.id, analysis_version=ANALYSIS_VERSION,
                config_hash=config_hash,
            )
            if audit_id is None:
                audit_id = queries.find_audit_id(
                    session, revision_id=rev.id, analysis_version=ANALYSIS_VERSION,
                config_hash=config_hash,
                )
            save_result(
                session,
                audit_id=audit_id,
                revision_id=rev.id,
                report=outcome.report,
                fingerprint=outcome.fingerprint,
            )
            return audit_id
    finally:
        engine.dispose()
