"""Store queries of the Celery backend: claim one audit by id, what to dispatch, worker
heartbeats and per-worker rates.

The audits table stays the queue of record and its lease the one answer to "who audits
what"; broker messages only say "audit N may be due". Each writing function commits its
own transaction, like the store's.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from auditor.store.db import begin_write
from auditor.store.models import Audit, Repo, Revision, WorkerHeartbeat, utcnow
from auditor.store.queue import due


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming one audit: ``claimed`` or why not (the row's status)."""

    claimed: bool
    status: str  # "running" (ours, or someone else's live lease), "done", "missing", ...
    attempts: int = 0
    holder: str | None = None
    lease_expires_at: datetime | None = None


def claim_audit(session: Session, audit_id: int, *, worker_id: str, lease_seconds: float,
                max_attempts: int) -> Claim:
    """Take the lease of audit ``audit_id`` if it is due, or running under an expired lease.

    One guarded UPDATE: of two deliveries of the same message (a redelivery after a
    broker timeout or a killed consumer) only one can match, and never while another
    worker's lease is alive. Not claimable: the row as it is, for the caller to log.
    An expired lease is taken over only below ``max_attempts`` claims (a revision that
    kills its worker every time is failed by ``requeue_expired`` instead).
    """
    begin_write(session)
    now = utcnow()
    expired = and_(Audit.status == "running", Audit.lease_expires_at < now,
                   Audit.attempts < max_attempts)
    result = session.execute(
        update(Audit)
        .where(Audit.id == audit_id, or_(due(now), expired))
        .values(status="running", worker_id=worker_id, started_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Audit.attempts + 1, next_attempt_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    row = session.execute(
        select(Audit.status, Audit.attempts, Audit.worker_id, Audit.lease_expires_at)
        .where(Audit.id == audit_id)
    ).one_or_none()
    session.rollback()
    if row is None:
        return Claim(claimed=False, status="missing")
    claimed = result.rowcount == 1  # type: ignore[attr-defined]
    return Claim(claimed=claimed, status=row.status, attempts=int(row.attempts),
                 holder=row.worker_id, lease_expires_at=row.lease_expires_at)


@dataclass(frozen=True)
class DueAudit:
    audit_id: int
    # What changes when the row goes back to the queue (re-queued, released, retried):
    # a new state means the message sent for the old one may be gone.
    state: tuple[Any, ...]
    repo_id: str
    sha: str
    files: frozenset[str] | None  # None: the crawl did not list them (no route known yet)
    behaviour_pending: bool = False  # the second pass: only the behavioural checks are left

    @property
    def behavioural(self) -> bool:
        """Whether the behavioural detectors can run on these files (they need full
        weights, config.json and tokenizer.json; adapters and pickle-only repos get weight
        checks only)."""
        names = self.files or frozenset()
        has_full = any(n.endswith(".safetensors") and not n.startswith("adapter_")
                       for n in names)
        return has_full and {"config.json", "tokenizer.json"} <= names


def due_audits(session: Session, *, limit: int = 10_000) -> list[DueAudit]:
    """Queued audits whose time has come, oldest upload first (the claim order of the
    in-process pool: parents before the merges that use them)."""
    now = utcnow()
    rows = session.execute(
        select(Audit.id, Audit.attempts, Audit.queued_at, Revision.files, Revision.sha,
               Repo.repo_id, Audit.behaviour_pending)
        .join(Revision, Revision.id == Audit.revision_id)
        .join(Repo, Repo.id == Revision.repo_pk)
        .where(due(now))
        .order_by(Audit.behaviour_pending.asc(), Revision.created_at.asc().nulls_last(),
                  Audit.queued_at, Audit.id)
        .limit(limit)
    ).all()
    session.rollback()
    out = []
    for row in rows:
        names = frozenset(str(f["path"]) for f in (row.files or [])
                          if isinstance(f, dict) and f.get("path"))
        out.append(DueAudit(audit_id=row.id, state=(row.attempts, row.queued_at),
                            repo_id=row.repo_id, sha=row.sha, files=names or None,
                            behaviour_pending=bool(row.behaviour_pending)))
    return out


def running_audit_ids(session: Session) -> set[int]:
    ids = set(session.scalars(select(Audit.id).where(Audit.status == "running")))
    session.rollback()
    return ids


# --- worker heartbeats -------------------------------------------------------------
def heartbeat(session: Session, *, worker_id: str, pid: int, queues: list[str], device: str,
              current_audit_id: int | None, done: int = 0, failed: int = 0,
              stopped: bool = False) -> None:
    """Insert or refresh this worker's row; ``done``/``failed`` are increments."""
    now = utcnow()
    for _ in range(2):
        begin_write(session)
        row = session.scalar(select(WorkerHeartbeat).where(
            WorkerHeartbeat.worker_id == worker_id))
        if row is None:
            row = WorkerHeartbeat(worker_id=worker_id, hostname=socket.gethostname(), pid=pid,
                                  queues=list(queues), device=device, started_at=now,
                                  audits_done=0, audits_failed=0)
            session.add(row)
        row.last_seen_at = now
        row.current_audit_id = current_audit_id
        row.audits_done = (row.audits_done or 0) + done
        row.audits_failed = (row.audits_failed or 0) + failed
        row.stopped_at = now if stopped else None
        try:
            session.commit()
            return
        except IntegrityError:  # two first heartbeats raced: update the winner's row
            session.rollback()


@dataclass(frozen=True)
class WorkerSeen:
    worker_id: str
    hostname: str
    queues: list[str]
    device: str
    last_seen_at: datetime
    current_audit_id: int | None
    audits_done: int
    audits_failed: int
    stopped: bool
    audits_per_minute: float


def workers_seen(session: Session, *, minutes: float = 5.0) -> list[WorkerSeen]:
    """Workers with a heartbeat in the last ``minutes``, with their audits per minute
    over that window (from the audits they finished, as the store recorded them)."""
    since = utcnow() - timedelta(minutes=minutes)
    rows = session.scalars(
        select(WorkerHeartbeat).where(WorkerHeartbeat.last_seen_at >= since)
        .order_by(WorkerHeartbeat.hostname, WorkerHeartbeat.worker_id)
    ).all()
    rates = dict(session.execute(
        select(Audit.worker_id, func.count())
        .where(Audit.status == "done", Audit.finished_at >= since)
        .group_by(Audit.worker_id)
    ).all())
    out = [WorkerSeen(worker_id=r.worker_id, hostname=r.hostname, queues=list(r.queues or []),
                      device=r.device, last_seen_at=r.last_seen_at,
                      current_audit_id=r.current_audit_id, audits_done=r.audits_done,
                      audits_failed=r.audits_failed, stopped=r.stopped_at is not None,
                      audits_per_minute=round(rates.get(r.worker_id, 0) / minutes, 3))
           for r in rows]
    session.rollback()
    return out
