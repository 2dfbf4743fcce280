"""The audit queue in one place: queueing, claims, leases, completion, failure and
re-queueing (expired leases, dead local workers, dependents of a finished audit).

Every writing function commits its own transaction: a claim, a completion or a failure
must be durable (and visible to other workers) when the function returns.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Select, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from auditor import __version__
from auditor.errors import StoreError
from auditor.schema import AuditReport
from auditor.store.db import begin_write
from auditor.store.models import (
    Audit,
    Comparison,
    FindingRow,
    Revision,
    utcnow,
)

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_BACKOFF_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 6 * 3600.0
# Statuses that make an equivalent audit pointless to queue again.
_LIVE_OR_DONE = ("queued", "running", "done", "skipped")


def queue_audit(
    session: Session,
    *,
    revision_id: int,
    analysis_version: str,
    config_hash: str,
    tool_version: str = __version__,
) -> int | None:
    """Queue an audit; ``None`` if an equivalent one is queued, running, done or skipped.

    A failed equivalent audit is re-queued in place (same row, attempts reset).
    """
    begin_write(session)
    key = and_(
        Audit.revision_id == revision_id,
        Audit.analysis_version == analysis_version,
        Audit.config_hash == config_hash,
    )
    existing = session.scalar(select(Audit).where(key))
    if existing is not None:
        if existing.status in _LIVE_OR_DONE:
            return None
        # Guarded: only one caller turns a failed row back into a queued one.
        result = session.execute(
            update(Audit)
            .where(Audit.id == existing.id, Audit.status == "failed")
            .values(
                status="queued",
                attempts=0,
                error=None,
                next_attempt_at=None,
                queued_at=utcnow(),
                worker_id=None,
                lease_expires_at=None,
                tool_version=tool_version,
            )
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return existing.id if result.rowcount == 1 else None  # type: ignore[attr-defined]
    audit = Audit(
        revision_id=revision_id,
        analysis_version=analysis_version,
        config_hash=config_hash,
        tool_version=tool_version,
        status="queued",
    )
    session.add(audit)
    try:
        session.commit()
    except IntegrityError:
        # Another process queued the same audit between our SELECT and INSERT.
        session.rollback()
        return None
    return audit.id


def due(now: datetime) -> ColumnElement[bool]:
    """Claimable audits: queued and due, or done with a behavioural pass pending."""
    return or_(
        and_(Audit.status == "queued",
             or_(Audit.next_attempt_at.is_(None), Audit.next_attempt_at <= now)),
        and_(Audit.status == "done", Audit.behaviour_pending.is_(True)),
    )


def _claimable(now: datetime) -> Select[tuple[int]]:
    # Oldest upload first: a merge's parents are uploaded before it, so by the time the
    # merge is audited their fingerprints are in the store to compare against.
    return (
        select(Audit.id)
        .join(Revision, Revision.id == Audit.revision_id)
        .where(due(now))
        .order_by(Audit.behaviour_pending.asc(), Revision.created_at.asc().nulls_last(),
                  Audit.queued_at, Audit.id)
        .limit(1)
    )


def claim_next_audit(
    session: Session, *, worker_id: str, lease_seconds: float, max_tries: int = 20
) -> Audit | None:
    """Take the oldest due queued audit for ``worker_id``; ``None`` if there is none.

    Safe across processes: PostgreSQL skips rows another claimer holds locked
    (FOR UPDATE SKIP LOCKED); SQLite takes the write lock first (BEGIN IMMEDIATE).
    The UPDATE is also guarded by ``status = 'queued'`` and its rowcount, so a row
    claimed by someone else in between is never taken twice.
    """
    is_pg = session.get_bind().dialect.name == "postgresql"
    for _ in range(max_tries):
        # A fresh transaction (and snapshot) per try; the caller's pending changes are
        # committed, as every writing function here does.
        if session.in_transaction():
            session.commit()
        if not is_pg:
            session.connection(execution_options={"sqlite_begin": "IMMEDIATE"})
        now = utcnow()
        query = _claimable(now)
        if is_pg:
            query = query.with_for_update(skip_locked=True, of=Audit)
        audit_id = session.scalar(query)
        if audit_id is None:
            session.rollback()
            return None
        result = session.execute(
            update(Audit)
            .where(Audit.id == audit_id, due(now))
            .values(
                status="running",
                worker_id=worker_id,
                started_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Audit.attempts + 1,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            continue
        session.commit()
        audit = session.get(Audit, audit_id, populate_existing=True)
        return audit
    session.rollback()
    return None


def renew_lease(session: Session, *, audit_id: int,
                worker_id: str,
                lease_seconds: float) -> bool:
    """Extend a running audit's lease; ``False`` if the worker no longer holds it."""
    begin_write(session)
    result = session.execute(
        update(Audit)
        .where(Audit.id == audit_id, Audit.status == "running", Audit.worker_id == worker_id)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def _get_audit(session: Session, audit_id: int) -> Audit:
    audit = session.get(Audit, audit_id, populate_existing=True)
    if audit is None:
        raise StoreError(f"no audit with id {audit_id}")
    return audit


def _check_holder(audit: Audit, worker_id: str | None) -> None:
    if worker_id is not None and (audit.status != "running" or audit.worker_id != worker_id):
        raise StoreError(
            f"audit {audit.id} is not held by worker {worker_id!r} (status {audit.status}, "
            f"worker {audit.worker_id!r}); its lease probably expired"
        )


def complete_audit(
    session: Session, *, audit_id: int, report: AuditReport, worker_id: str | None = None
) -> None:
    """Mark the audit done and store the report JSON, its comparisons and findings.

    Calling it again replaces the stored comparisons and findings (no duplicates).
    With ``worker_id``, raises StoreError if that worker lost the lease.
    """
    begin_write(session)
    audit = _get_audit(session, audit_id)
    _check_holder(audit, worker_id)
    audit.comparisons.clear()
    audit.findings.clear()
    session.flush()
    curves = {b.other_repo_id: b for b in report.barriers}
    for entry in report.lineage:
        curve = curves.get(entry.repo_id)
        audit.comparisons.append(
            Comparison(
                other_repo_id=entry.repo_id,
                other_revision=entry.revision,
                relation=entry.relation,
                cosine=entry.cosine,
                p_value=entry.p_value,
                coefficient=entry.coefficient,
                barrier=entry.barrier
                if entry.barrier is not None
                else (curve.barrier if curve else None),
                barrier_curve=curve.model_dump(mode="json") if curve else None,
            )
        )
    for f in report.findings:
        audit.findings.append(
            FindingRow(
                rule_id=f.rule_id,
                severity=str(f.severity),
                confidence=f.confidence,
                title=f.title,
                message=f.message,
                subject_repo=report.subject.repo_id,
                related_repo=f.related_repo,
                evidence=f.evidence,
                suppressed=f.suppressed,
                suppressed_reason=f.suppressed_reason,
            )
        )
    now = utcnow()
    audit.report = report.model_dump(mode="json")
    audit.tool_version = report.tool_version
    audit.finished_at = now
    audit.lease_expires_at = None
    audit.error = None
    # A first pass that deferred the behavioural checks is done (its report, which says
    # what is pending, is shown) and due again at once (``due``), claimed after every
    # first pass; the second pass's report replaces this one.
    pending = bool(report.coverage.get("behaviour_deferred"))
    audit.behaviour_pending = pending
    audit.status = "done"
    if pending:
        audit.queued_at, audit.attempts, audit.next_attempt_at = now, 0, None
    session.commit()


def fail_audit(
    session: Session,
    *,
    audit_id: int,
    error: str,
    retryable: bool,
    worker_id: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    backoff_seconds: float = DEFAULT_BACKOFF_SECONDS,
    retry_after: float | None = None,
) -> str:
    """Record a failure; a retryable one is re-queued with exponential backoff until
    ``max_attempts`` claims were spent. Returns the new status ("queued" or "failed")."""
    begin_write(session)
    audit = _get_audit(session, audit_id)
    _check_holder(audit, worker_id)
    now = utcnow()
    audit.error = error
    audit.worker_id = None
    audit.lease_expires_at = None
    if retryable and audit.attempts < max_attempts:
        delay = min(backoff_seconds * 2 ** max(audit.attempts - 1, 0), MAX_BACKOFF_SECONDS)
        if retry_after is not None:
            delay = max(delay, retry_after)
        audit.status = "queued"
        audit.next_attempt_at = now + timedelta(seconds=delay)
    else:
        audit.status = "failed"
        audit.finished_at = now
        audit.next_attempt_at = None
    session.commit()
    return audit.status


def skip_audit(session: Session, *, audit_id: int,
               reason: str) -> None:
    """A revision that cannot be audited and never will be (gated, no weights)."""
    begin_write(session)
    audit = _get_audit(session, audit_id)
    audit.status = "skipped"
    audit.error = reason
    audit.finished_at = utcnow()
    audit.worker_id = None
    audit.lease_expires_at = None
    session.commit()


def requeue_expired(
    session: Session, *, now: datetime | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> int:
    """Put running audits whose lease expired (killed worker) back in the queue.

    An audit that already used ``max_attempts`` claims is marked failed instead, so a
    revision that kills its worker every time cannot loop forever. Returns how many
    audits were re-queued.
    """
    begin_write(session)
    now = now or utcnow()
    expired = and_(Audit.status == "running", Audit.lease_expires_at < now)
    session.execute(
        update(Audit)
        .where(expired, Audit.attempts >= max_attempts)
        .values(
            status="failed",
            worker_id=None,
            lease_expires_at=None,
            finished_at=now,
            error="lease expired too many times (worker killed?)",
        )
        .execution_options(synchronize_session=False)
    )
    result = session.execute(
        update(Audit)
        .where(expired)
        .values(status="queued", worker_id=None, lease_expires_at=None, next_attempt_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]


def already_audited(session: Session, *, revision_id: int, analysis_version: str) -> bool:
    """True if the revision has a done (or deliberately skipped) audit at this version."""
    found = session.scalar(
        select(Audit.id)
        .where(
            Audit.revision_id == revision_id,
            Audit.analysis_version == analysis_version,
            Audit.status.in_(("done", "skipped")),
        )
        .limit(1)
    )
    return found is not None


def worker_prefix() -> str:
    """``host:pid`` of this process; worker ids start with it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def requeue_dead_local(session: Session) -> int:
    """Re-queue running audits held by a worker of a dead process on this host.

    A daemon killed with SIGKILL leaves its audits running until their lease expires;
    on restart on the same host we know the holder is gone and need not wait. A live
    pid (even a reused one) is left alone: the lease then decides, which is safe.
    """
    host = socket.gethostname()
    rows = session.execute(
        select(Audit.id, Audit.worker_id).where(Audit.status == "running")
    ).all()
    session.rollback()
    dead: list[tuple[int, str]] = []
    for audit_id, worker_id in rows:
        parts = (worker_id or "").split(":")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1])):
            dead.append((audit_id, worker_id))
    requeued = 0
    for audit_id, worker_id in dead:
        if release_audit(session, audit_id=audit_id, worker_id=worker_id):
            requeued += 1
    return requeued


def release_audit(session: Session, *, audit_id: int,
                  worker_id: str) -> bool:
    """Give a running audit back to the queue without counting the attempt
    (shutdown or a dead holder is not the audit's fault)."""
    begin_write(session)
    result = session.execute(
        update(Audit)
        .where(Audit.id == audit_id, Audit.status == "running", Audit.worker_id == worker_id)
        .values(
            status="queued",
            worker_id=None,
            lease_expires_at=None,
            next_attempt_at=None,
            attempts=func.max(Audit.attempts - 1, 0)
            if session.get_bind().dialect.name == "sqlite"
            else func.greatest(Audit.attempts - 1, 0),
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]
