"""The store's API for the daemon, the orchestrator and the reports.

Functions that change state commit their own transaction: a claim, a completion or a
failure must be durable (and visible to other workers) when the function returns.
Every timestamp is timezone-aware UTC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from auditor import __version__
from auditor.errors import StoreError
from auditor.rules.authz import authorization_matches, owner_of
from auditor.schema import AuditReport
from auditor.store.models import (
    Audit,
    Authorization,
    Comparison,
    CrawlCursor,
    FindingRow,
    Fingerprint,
    Repo,
    Revision,
    WatchedBase,
    utcnow,
)

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_BACKOFF_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 6 * 3600.0
# Statuses that make an equivalent audit pointless to queue again.
_LIVE_OR_DONE = ("queued", "running", "done", "skipped")


def begin_write(session: Session) -> None:
    """Start a write transaction.

    SQLite cannot upgrade a read transaction to a write one while another process
    writes (it fails at once with "database is locked", without waiting): take the
    write lock first with BEGIN IMMEDIATE. Anything the caller left pending in the
    session is committed first (these functions commit anyway). No-op elsewhere.
    """
    if session.get_bind().dialect.name != "sqlite":
        return
    if session.in_transaction():
        session.commit()
    session.connection(execution_options={"sqlite_begin": "IMMEDIATE"})


# Kept for callers that imported the earlier private name.
_begin_write = begin_write


# --- watched bases ---------------------------------------------------------------
def watch_add(session: Session, repo_id: str, *, note: str | None = None) -> WatchedBase:
    begin_write(session)
    row = session.scalar(select(WatchedBase).where(WatchedBase.repo_id == repo_id))
    if row is None:
        row = WatchedBase(repo_id=repo_id, note=note)
        session.add(row)
    elif note is not None:
        row.note = note
    session.commit()
    return row


def watch_remove(session: Session, repo_id: str) -> bool:
    begin_write(session)
    row = session.scalar(select(WatchedBase).where(WatchedBase.repo_id == repo_id))
    if row is None:
        return False
    session.delete(row)
    session.commit()
    return True


def watch_list(session: Session) -> list[WatchedBase]:
    return list(session.scalars(select(WatchedBase).order_by(WatchedBase.repo_id)))


# --- repos and revisions ---------------------------------------------------------
def get_repo(session: Session, repo_id: str) -> Repo | None:
    return session.scalar(select(Repo).where(Repo.repo_id == repo_id))


def upsert_repo(
    session: Session,
    repo_id: str,
    *,
    owner: str | None = None,
    declared_base_models: Sequence[str] | None = None,
    declared_relation: str | None = None,
    gated: bool | None = None,
    private: bool | None = None,
    skip_reason: str | None = None,
    family_base: str | None = None,
) -> Repo:
    """Create or update a repo; fields left ``None`` keep their stored value.

    ``family_base`` adds a watched base to the repo's families (never removes one).
    """
    begin_write(session)
    repo = get_repo(session, repo_id)
    if repo is None:
        repo = Repo(repo_id=repo_id, owner=owner or owner_of(repo_id))
        session.add(repo)
    elif owner is not None:
        repo.owner = owner
    if declared_base_models is not None:
        repo.declared_base_models = list(declared_base_models)
    if declared_relation is not None:
        repo.declared_relation = declared_relation
    if gated is not None:
        repo.gated = gated
    if private is not None:
        repo.private = private
    if skip_reason is not None:
        repo.skip_reason = skip_reason or None
    if family_base is not None and family_base not in (repo.family_bases or []):
        repo.family_bases = [*(repo.family_bases or []), family_base]
    session.commit()
    return repo


def family_of(repo: Repo) -> list[str]:
    """Watched bases the repo belongs to (crawled under), else what its card declares."""
    return [str(b) for b in (repo.family_bases or repo.declared_base_models or [])]


def get_revision(session: Session, repo_id: str, sha: str) -> Revision | None:
    return session.scalar(
        select(Revision).join(Repo).where(Repo.repo_id == repo_id, Revision.sha == sha)
    )


def upsert_revision(
    session: Session,
    repo_id: str,
    sha: str,
    *,
    created_at: datetime | None = None,
    files: Sequence[dict[str, Any]] | None = None,
    formats: Sequence[str] | None = None,
) -> Revision:
    """Create or update the revision ``sha`` of ``repo_id`` (the repo is created if new)."""
    begin_write(session)
    repo = get_repo(session, repo_id) or upsert_repo(session, repo_id)
    rev = session.scalar(select(Revision).where(Revision.repo_pk == repo.id, Revision.sha == sha))
    if rev is None:
        rev = Revision(repo_pk=repo.id, sha=sha)
        session.add(rev)
    if created_at is not None:
        rev.created_at = created_at
    if files is not None:
        rev.files = [dict(f) for f in files]
    if formats is not None:
        rev.formats = sorted(set(formats))
    session.commit()
    return rev


# --- the audit queue --------------------------------------------------------------
def queue_audit(
    session: Session,
    revision_id: int,
    *,
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


def renew_lease(session: Session, audit_id: int, *, worker_id: str, lease_seconds: float) -> bool:
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
    session: Session, audit_id: int, *, report: AuditReport, worker_id: str | None = None
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
    audit_id: int,
    *,
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


def skip_audit(session: Session, audit_id: int, *, reason: str) -> None:
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


def already_audited(session: Session, revision_id: int, analysis_version: str) -> bool:
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


def find_audit_id(
    session: Session, revision_id: int, *, analysis_version: str, config_hash: str
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


def get_audit(session: Session, audit_id: int) -> Audit | None:
    return session.get(Audit, audit_id, populate_existing=True)


def audit_report(audit: Audit) -> AuditReport | None:
    return AuditReport.model_validate(audit.report) if audit.report else None


# --- fingerprints -----------------------------------------------------------------
def save_fingerprint(
    session: Session,
    revision_id: int,
    *,
    analysis_version: str,
    data: bytes | None = None,
    path: str | None = None,
    error_bound: float | None = None,
) -> int:
    begin_write(session)
    if data is None and path is None:
        raise StoreError("a fingerprint needs its bytes or a file path")
    row = session.scalar(
        select(Fingerprint).where(
            Fingerprint.revision_id == revision_id,
            Fingerprint.analysis_version == analysis_version,
        )
    )
    if row is None:
        row = Fingerprint(revision_id=revision_id, analysis_version=analysis_version)
        session.add(row)
    row.data, row.path, row.error_bound, row.created_at = data, path, error_bound, utcnow()
    session.commit()
    return row.id


def load_fingerprint(
    session: Session, revision_id: int, *, analysis_version: str
) -> Fingerprint | None:
    """The stored fingerprint row (``.data`` bytes or ``.path``), or None."""
    return session.scalar(
        select(Fingerprint).where(
            Fingerprint.revision_id == revision_id,
            Fingerprint.analysis_version == analysis_version,
        )
    )


def load_fingerprint_bytes(
    session: Session, revision_id: int, *, analysis_version: str
) -> bytes | None:
    row = load_fingerprint(session, revision_id, analysis_version=analysis_version)
    return row.data if row is not None else None


# --- crawl cursors -------------------------------------------------------------------
def get_cursor(session: Session, base_repo_id: str) -> CrawlCursor | None:
    return session.scalar(select(CrawlCursor).where(CrawlCursor.base_repo_id == base_repo_id))


def set_cursor(
    session: Session,
    base_repo_id: str,
    *,
    last_created_at: datetime | None = None,
    last_sha: str | None = None,
    error: str | None = None,
) -> CrawlCursor:
    """Record a crawl of ``base_repo_id``: a success moves the cursor (fields given);
    an ``error`` keeps the cursor and records the error."""
    begin_write(session)
    cursor = get_cursor(session, base_repo_id)
    if cursor is None:
        cursor = CrawlCursor(base_repo_id=base_repo_id)
        session.add(cursor)
    now = utcnow()
    if error is not None:
        cursor.last_error, cursor.last_error_at = error, now
    else:
        if last_created_at is not None:
            cursor.last_created_at = last_created_at
        if last_sha is not None:
            cursor.last_sha = last_sha
        cursor.last_success_at = now
    session.commit()
    return cursor


def last_crawls(session: Session) -> list[CrawlCursor]:
    return list(session.scalars(select(CrawlCursor).order_by(CrawlCursor.base_repo_id)))


# --- authorizations ------------------------------------------------------------------
def add_authorization(
    session: Session,
    *,
    owner: str,
    subject: str,
    related_repo: str | None = None,
    note: str | None = None,
) -> Authorization:
    """``owner`` allows ``subject`` (repo id or fnmatch pattern) to use their models
    (only ``related_repo`` if given). Adding the same grant twice updates the note."""
    begin_write(session)
    if related_repo is not None and owner_of(related_repo) != owner:
        raise StoreError(f"{owner!r} cannot authorize use of {related_repo!r}: not their repo")
    existing = session.scalar(
        select(Authorization).where(
            Authorization.owner == owner,
            Authorization.subject == subject,
            Authorization.related_repo.is_(None)
            if related_repo is None
            else Authorization.related_repo == related_repo,
        )
    )
    if existing is not None:
        if note is not None:
            existing.note = note
        session.commit()
        return existing
    row = Authorization(owner=owner, subject=subject, related_repo=related_repo, note=note)
    session.add(row)
    session.commit()
    return row


def remove_authorization(session: Session, authorization_id: int) -> bool:
    begin_write(session)
    row = session.get(Authorization, authorization_id)
    if row is None:
        return False
    session.delete(row)
    session.commit()
    return True


def list_authorizations(session: Session, *, owner: str | None = None) -> list[Authorization]:
    query = select(Authorization).order_by(Authorization.owner, Authorization.id)
    if owner is not None:
        query = query.where(Authorization.owner == owner)
    return list(session.scalars(query))


def match_authorizations(
    session: Session, *, subject_repo: str, related_repo: str | None
) -> list[Authorization]:
    if not related_repo:
        return []
    candidates = list_authorizations(session, owner=owner_of(related_repo))
    return [
        a
        for a in candidates
        if authorization_matches(a, subject_repo=subject_repo, related_repo=related_repo)
    ]


# --- queries for reports and metrics ---------------------------------------------------
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


def latest_done_audit(session: Session, revision_id: int) -> Audit | None:
    return session.scalar(
        select(Audit)
        .where(Audit.revision_id == revision_id, Audit.status == "done")
        .order_by(Audit.finished_at.desc(), Audit.id.desc())
        .limit(1)
    )


def audit_history(session: Session, revision_id: int) -> list[Audit]:
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


def audits_by_related_owner(session: Session, owner: str) -> list[Audit]:
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
