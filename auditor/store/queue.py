"""The audit queue in one place: queueing, claims, leases, completion, failure and
re-queueing (expired leases, dead local workers, dependents of a finished audit).

Every writing function commits its own transaction: a claim, a completion or a failure
must be durable (and visible to other workers) when the function returns.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, Text, and_, cast, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from auditor import __version__
from auditor.errors import StoreError
from auditor.schema import AuditReport
from auditor.store.catalog import family_of
from auditor.store.db import begin_write
from auditor.store.models import (
    Audit,
    Comparison,
    FindingRow,
    Fingerprint,
    Repo,
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


def _claimable(now: datetime) -> Select[tuple[int]]:
    # Oldest upload first: a merge's parents are uploaded before it, so by the time the
    # merge is audited their fingerprints are in the store to compare against.
    return (
        select(Audit.id)
        .join(Revision, Revision.id == Audit.revision_id)
        .where(
            Audit.status == "queued",
            or_(Audit.next_attempt_at.is_(None), Audit.next_attempt_at <= now),
        )
        .order_by(Revision.created_at.asc().nulls_last(), Audit.queued_at, Audit.id)
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
            .where(Audit.id == audit_id, Audit.status == "queued")
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
    audit.status = "done"
    audit.report = report.model_dump(mode="json")
    audit.tool_version = report.tool_version
    audit.finished_at = now
    audit.lease_expires_at = None
    audit.error = None
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
_PARENT_RELATIONS = ("merge_parent", "finetune_parent", "clone")
MAX_DEPENDENT_RUNS = 4


def _missed(report: dict[str, Any] | None, other: str, other_flagged: bool) -> bool:
    """Did this done audit run without ``other`` (a family member) in its comparison set,
    or without ``other``'s backdoor verdict while ``other`` is its parent?"""
    lineage = (report or {}).get("lineage") or []
    if not lineage:
        return False  # no weights analysed: it compared with nobody, nothing to redo
    relation = {e.get("repo_id"): e.get("relation") for e in lineage}.get(other)
    inherited = ((report or {}).get("backdoor") or {}).get("inherited_from") or []
    return relation is None or (
        other_flagged and relation in _PARENT_RELATIONS and other not in inherited
    )


def _in_family(family: set[str]) -> Any:
    """SQL pre-filter: repos whose family or declared bases' JSON text names one of
    ``family`` (the exact test follows in Python). Only the family's done audits are
    loaded, never the whole store's reports."""
    conds = []
    for base in sorted(family):
        quoted = json.dumps(base).replace("\\", "\\\\").replace("%", "\\%") \
            .replace("_", "\\_")
        for column in (Repo.family_bases, Repo.declared_base_models):
            conds.append(cast(column, Text).like(f"%{quoted}%", escape="\\"))
    return or_(*conds)


def requeue_dependents(session: Session, *, revision_id: int, analysis_version: str) -> list[str]:
    """After an audit is done, re-queue what ran with an incomplete comparison set.

    Workers run in parallel, so an audit may have read the store while an earlier upload
    of its family was still being audited: a merge could have missed a parent, or its
    backdoor verdict. Checked both ways: later uploads' done audits that lack this
    revision, and this audit itself against earlier uploads done meanwhile. Only the later
    upload of a pair is ever re-run (an earlier model cannot contain a later one), so the
    re-queues end. Returns the re-queued repo ids.
    """

    this = session.execute(
        select(Repo, Revision.created_at).join(Revision, Revision.repo_pk == Repo.id)
        .where(Revision.id == revision_id)
    ).one_or_none()
    if this is None or this[1] is None:
        session.rollback()
        return []
    repo, created = this
    family = set(family_of(repo))
    if not family:
        session.rollback()
        return []
    rows = session.execute(
        select(Audit, Repo, Revision.created_at)
        .join(Revision, Audit.revision_id == Revision.id)
        .join(Repo, Revision.repo_pk == Repo.id)
        .join(Fingerprint, (Fingerprint.revision_id == Revision.id)
              & (Fingerprint.analysis_version == analysis_version))
        .where(Audit.status == "done", Audit.analysis_version == analysis_version,
               _in_family(family))
    ).all()

    def flagged(audit: Audit) -> bool:
        return bool(((audit.report or {}).get("backdoor") or {}).get("suspected"))

    own = next((a for a, r, _ in rows if a.revision_id == revision_id), None)
    stale: list[tuple[int, str]] = []
    for audit, other, other_created in rows:
        if other.id == repo.id or other_created is None or not family & set(family_of(other)):
            continue
        if other_created > created and _missed(audit.report, repo.repo_id,
                                               own is not None and flagged(own)):
            stale.append((audit.id, other.repo_id))
        elif (other_created < created and own is not None
              and _missed(own.report, other.repo_id, flagged(audit))
              and (own.id, repo.repo_id) not in stale):
            stale.append((own.id, repo.repo_id))
    session.rollback()
    if not stale:
        return []
    begin_write(session)
    result = session.execute(
        # attempts keeps counting: a comparison that can never be completed (an unreadable
        # stored fingerprint, say) stops being retried after a few runs.
        update(Audit).where(Audit.id.in_([a for a, _ in stale]), Audit.status == "done",
                            Audit.attempts < MAX_DEPENDENT_RUNS)
        .values(status="queued", worker_id=None, lease_expires_at=None,
                next_attempt_at=None, queued_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount == 0:  # type: ignore[attr-defined]
        return []
    return [r for _, r in stale]
