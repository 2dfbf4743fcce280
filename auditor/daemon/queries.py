"""Store queries the daemon needs beyond ``auditor.store.repository``.

They live here (not in the store) so the daemon can grow without touching the store's
API; each writing function commits its own transaction like the store's do.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from auditor.store.models import Audit, Fingerprint, Repo, Revision, WatchedBase, utcnow
from auditor.store.repository import begin_write

if TYPE_CHECKING:
    from auditor.schema import BackdoorInfo
    from auditor.settings import Settings


def analysis_config_hash(settings: Settings) -> str:
    """A short hash of the settings that change an audit's result.

    Part of the audit's unique key: changing them queues the revisions again (the
    history is kept) while unrelated settings (workers, ports, token) do not.
    """
    rules_digest = ""
    if settings.rules_dir is not None and settings.rules_dir.is_dir():
        digest = hashlib.sha256()
        for path in sorted(settings.rules_dir.glob("*.y*ml")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        rules_digest = digest.hexdigest()
    probe_digest = ""
    if settings.probe_file is not None and settings.probe_file.is_file():
        probe_digest = hashlib.sha256(settings.probe_file.read_bytes()).hexdigest()
    payload = {
        "barrier_points": settings.barrier_points,
        "probe_file": probe_digest,
        "rules": rules_digest,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --- worker identity -------------------------------------------------------------
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
        if release_audit(session, audit_id, worker_id=worker_id):
            requeued += 1
    return requeued


def release_audit(session: Session, audit_id: int, *, worker_id: str) -> bool:
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


# --- what an audit needs ---------------------------------------------------------
@dataclass(frozen=True)
class AuditTarget:
    audit_id: int
    revision_id: int
    repo_id: str
    sha: str
    base_repo_id: str | None
    analysis_version: str


def audit_target(session: Session, audit_id: int) -> AuditTarget:
    """The repo, revision and watched base of an audit."""
    row = session.execute(
        select(Audit.id, Audit.revision_id, Audit.analysis_version, Revision.sha, Repo.repo_id,
               Repo.declared_base_models, Repo.family_bases)
        .join(Revision, Audit.revision_id == Revision.id)
        .join(Repo, Revision.repo_pk == Repo.id)
        .where(Audit.id == audit_id)
    ).one()
    family = [b for b in (row.family_bases or []) if isinstance(b, str)]
    declared = [b for b in (row.declared_base_models or []) if isinstance(b, str)]
    watched = set(session.scalars(select(WatchedBase.repo_id)))
    # The watched base the crawler found it under; a merge's card lists its parents.
    candidates = family + declared
    base = next((b for b in candidates if b in watched), candidates[0] if candidates else None)
    session.rollback()
    return AuditTarget(audit_id=row.id, revision_id=row.revision_id, repo_id=row.repo_id,
                       sha=row.sha, base_repo_id=base, analysis_version=row.analysis_version)


@dataclass(frozen=True)
class StoredHomologue:
    repo_id: str
    revision: str
    fingerprint: bytes
    backdoor: BackdoorInfo | None
    created_at: datetime | None = None


def stored_homologues(
    session: Session, *, base_repo_id: str, exclude_repo_id: str, analysis_version: str
) -> list[StoredHomologue]:
    """Fingerprints of the base's other known derivatives (newest audited revision of each
    repo with a fingerprint at ``analysis_version``), with the backdoor verdict of their
    latest done audit when it was flagged."""
    from auditor.schema import BackdoorInfo

    rows = session.execute(
        select(Repo.repo_id, Repo.family_bases, Revision.id, Revision.sha,
               Revision.created_at.label("uploaded_at"),
               Fingerprint.data, Fingerprint.path, Fingerprint.created_at)
        .join(Revision, Revision.repo_pk == Repo.id)
        .join(Fingerprint, Fingerprint.revision_id == Revision.id)
        .where(Fingerprint.analysis_version == analysis_version,
               Repo.repo_id != exclude_repo_id)
        .order_by(Fingerprint.created_at.desc(), Fingerprint.id.desc())
    ).all()
    chosen: dict[str, Any] = {}
    for row in rows:
        # JSON containment is not portable across SQLite / PostgreSQL: filter here.
        if base_repo_id not in (row.family_bases or []) or row.repo_id in chosen:
            continue
        chosen[row.repo_id] = row
    out: list[StoredHomologue] = []
    for repo_id, row in chosen.items():
        data = row.data
        if data is None and row.path:
            try:
                with open(row.path, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue  # a lost fingerprint file only shrinks the comparison set
        if data is None:
            continue
        report = session.scalar(
            select(Audit.report)
            .where(Audit.revision_id == row.id, Audit.status == "done",
                   Audit.analysis_version == analysis_version)
            .order_by(Audit.finished_at.desc(), Audit.id.desc())
            .limit(1)
        )
        if report is None:
            # Fingerprinted but not yet done (the audit commits the fingerprint first): its
            # verdicts are not known yet. requeue_dependents re-runs us once it is done.
            continue
        backdoor = None
        if isinstance(report, dict) and isinstance(report.get("backdoor"), dict):
            info = BackdoorInfo.model_validate(report["backdoor"])
            backdoor = info if info.suspected else None
        out.append(StoredHomologue(repo_id=repo_id, revision=row.sha, fingerprint=data,
                                   backdoor=backdoor, created_at=row.uploaded_at))
    session.rollback()
    return out


# --- queue facts -----------------------------------------------------------------
def pending_count(session: Session) -> int:
    """Audits still to run (queued, including those waiting for a retry, or running)."""
    n = session.scalar(
        select(func.count()).select_from(Audit).where(Audit.status.in_(("queued", "running")))
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


def requeue_dependents(session: Session, *, revision_id: int, analysis_version: str) -> list[str]:
    """After an audit is done, re-queue what ran with an incomplete comparison set.

    Workers run in parallel, so an audit may have read the store while an earlier upload
    of its family was still being audited: a merge could have missed a parent, or its
    backdoor verdict. Checked both ways: later uploads' done audits that lack this
    revision, and this audit itself against earlier uploads done meanwhile. Only the later
    upload of a pair is ever re-run (an earlier model cannot contain a later one), so the
    re-queues end. Returns the re-queued repo ids.
    """
    from auditor.store.repository import family_of

    this = session.execute(
        select(Repo, Revision.created_at).join(Revision, Revision.repo_pk == Repo.id)
        .where(Revision.id == revision_id)
    ).one_or_none()
    if this is None or this[1] is None:
        session.rollback()
        return []
    repo, created = this
    family = set(family_of(repo))
    rows = session.execute(
        select(Audit, Repo, Revision.created_at)
        .join(Revision, Audit.revision_id == Revision.id)
        .join(Repo, Revision.repo_pk == Repo.id)
        .join(Fingerprint, (Fingerprint.revision_id == Revision.id)
              & (Fingerprint.analysis_version == analysis_version))
        .where(Audit.status == "done", Audit.analysis_version == analysis_version)
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
