"""Read-only queries for reports, metrics and the daemon's status."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from auditor.errors import StoreError
from auditor.schema import AuditReport
from auditor.store.models import (
    Audit,
    Comparison,
    FindingRow,
    Revision,
)


def find_audit_id(
    session: Session, *, revision_id: int, analysis_version: str, config_hash: str
) -> int:
    """The id of the audit row for this key (it exists once queue_audit has run)."""
    found = session.scalar(
        select(Audit.id).where(
            Audit.revision_id == revision_id,
            Audit.analysis_version == analysis_version,
            Audit.config_hash == config_hash,
        )
    )
    if found is None:
        raise StoreError(f"no audit of revision {revision_id} at version {analysis_version}")
    return found


def get_audit(session: Session, *, audit_id: int) -> Audit | None:
    return session.get(Audit, audit_id, populate_existing=True)


def audit_report(audit: Audit) -> AuditReport | None:
    return AuditReport.model_validate(audit.report) if audit.report else None


@dataclass(frozen=True)
class QueueDepth:
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0


def queue_depth(session: Session) -> QueueDepth:
    counts = dict(session.execute(select(Audit.status, func.count()).group_by(Audit.status)).all())
    return QueueDepth(**{k: int(v) for k, v in counts.items()})


def latest_done_audits(session: Session) -> list[Audit]:
    """The latest done audit of every revision (newest analysis, newest finish)."""
    ranked = (
        select(
            Audit.id,
            func.row_number()
            .over(
                partition_by=Audit.revision_id,
                order_by=(Audit.finished_at.desc(), Audit.id.desc()),
            )
            .label("rank"),
        )
        .where(Audit.status == "done")
        .subquery()
    )
    query = (
        select(Audit)
        .join(ranked, ranked.c.id == Audit.id)
        .where(ranked.c.rank == 1)
        .order_by(Audit.finished_at.desc(), Audit.id.desc())
    )
    return list(session.scalars(query))


def latest_done_audit(session: Session, *, revision_id: int) -> Audit | None:
    return session.scalar(
        select(Audit)
        .where(Audit.revision_id == revision_id, Audit.status == "done")
        .order_by(Audit.finished_at.desc(), Audit.id.desc())
        .limit(1)
    )


def audit_history(session: Session, *, revision_id: int) -> list[Audit]:
    return list(
        session.scalars(select(Audit).where(Audit.revision_id == revision_id).order_by(Audit.id))
    )


def list_findings(
    session: Session,
    *,
    audit_id: int | None = None,
    rule_id: str | None = None,
    include_suppressed: bool = True,
    latest_only: bool = False,
) -> list[FindingRow]:
    """Findings, optionally of one audit or rule, or only of each revision's latest audit."""
    query = select(FindingRow).order_by(FindingRow.id)
    if audit_id is not None:
        query = query.where(FindingRow.audit_id == audit_id)
    if rule_id is not None:
        query = query.where(FindingRow.rule_id == rule_id)
    if not include_suppressed:
        query = query.where(FindingRow.suppressed.is_(False))
    if latest_only:
        query = query.where(FindingRow.audit_id.in_([a.id for a in latest_done_audits(session)]))
    return list(session.scalars(query))


def audits_by_related_owner(session: Session, *, owner: str) -> list[Audit]:
    """Done audits whose comparisons or findings involve a repo of ``owner``."""
    pattern = owner.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"
    via_findings = select(FindingRow.audit_id).where(
        FindingRow.related_repo.like(pattern, escape="\\")
    )
    via_comparisons = select(Comparison.audit_id).where(
        Comparison.other_repo_id.like(pattern, escape="\\")
    )
    query = (
        select(Audit)
        .where(
            Audit.status == "done",
            or_(Audit.id.in_(via_findings), Audit.id.in_(via_comparisons)),
        )
        .order_by(Audit.finished_at.desc(), Audit.id.desc())
    )
    return list(session.scalars(query))


def recent_failures(session: Session, *, limit: int = 50) -> list[Audit]:
    """Failed audits and queued ones waiting for a retry after an error."""
    query = (
        select(Audit)
        .where(
            or_(Audit.status == "failed", and_(Audit.status == "queued", Audit.error.is_not(None)))
        )
        .order_by(Audit.id.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


def pending_count(session: Session) -> int:
    """Audits still to run: queued (retries included), running, or done with a deferred
    behavioural pass pending."""
    n = session.scalar(
        select(func.count()).select_from(Audit).where(or_(
            Audit.status.in_(("queued", "running")),
            (Audit.status == "done") & Audit.behaviour_pending.is_(True)))
    )
    session.rollback()
    return int(n or 0)


def next_due_at(session: Session) -> datetime | None:
    """When the earliest queued audit becomes claimable (None: now or nothing queued)."""
    value = session.scalar(
        select(func.min(Audit.next_attempt_at)).where(Audit.status == "queued")
    )
    session.rollback()
    return value


def running_shas(session: Session) -> set[str]:
    """Commits being audited right now (protected from cache eviction)."""
    shas = set(session.scalars(
        select(Revision.sha).join(Audit, Audit.revision_id == Revision.id)
        .where(Audit.status == "running")
    ))
    session.rollback()
    return shas
