"""The catalog: repos, revisions, fingerprints and crawl cursors.

Functions that change state commit their own transaction; every timestamp is
timezone-aware UTC.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, cast, select
from sqlalchemy.orm import Session

from auditor.errors import StoreError
from auditor.rules.authz import owner_of
from auditor.store.db import begin_write
from auditor.store.models import (
    Audit,
    CrawlCursor,
    Fingerprint,
    Repo,
    Revision,
    WatchedBase,
    utcnow,
)

if TYPE_CHECKING:
    from auditor.schema import BackdoorInfo


def get_repo(session: Session, *, repo_id: str) -> Repo | None:
    return session.scalar(select(Repo).where(Repo.repo_id == repo_id))


def upsert_repo(
    session: Session,
    *,
    repo_id: str,
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
    repo = get_repo(session, repo_id=repo_id)
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


def get_revision(session: Session, *, repo_id: str, sha: str) -> Revision | None:
    return session.scalar(
        select(Revision).join(Repo).where(Repo.repo_id == repo_id, Revision.sha == sha)
    )


def upsert_revision(
    session: Session,
    *,
    repo_id: str,
    sha: str,
    created_at: datetime | None = None,
    files: Sequence[dict[str, Any]] | None = None,
    formats: Sequence[str] | None = None,
) -> Revision:
    """Create or update the revision ``sha`` of ``repo_id`` (the repo is created if new)."""
    begin_write(session)
    repo = get_repo(session, repo_id=repo_id) or upsert_repo(session, repo_id=repo_id)
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


def save_fingerprint(
    session: Session,
    *,
    revision_id: int,
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
    session: Session, *, revision_id: int, analysis_version: str
) -> Fingerprint | None:
    """The stored fingerprint row (``.data`` bytes or ``.path``), or None."""
    return session.scalar(
        select(Fingerprint).where(
            Fingerprint.revision_id == revision_id,
            Fingerprint.analysis_version == analysis_version,
        )
    )


def load_fingerprint_bytes(
    session: Session, *, revision_id: int, analysis_version: str
) -> bytes | None:
    row = load_fingerprint(session, revision_id=revision_id, analysis_version=analysis_version)
    return row.data if row is not None else None


def get_cursor(session: Session, *, base_repo_id: str) -> CrawlCursor | None:
    return session.scalar(select(CrawlCursor).where(CrawlCursor.base_repo_id == base_repo_id))


def set_cursor(
    session: Session,
    *,
    base_repo_id: str,
    last_created_at: datetime | None = None,
    last_sha: str | None = None,
    error: str | None = None,
) -> CrawlCursor:
    """Record a crawl of ``base_repo_id``: a success moves the cursor (fields given);
    an ``error`` keeps the cursor and records the error."""
    begin_write(session)
    cursor = get_cursor(session, base_repo_id=base_repo_id)
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

    # SQL narrows to the base's family (the JSON list's text holds the quoted id: portable
    # across SQLite and PostgreSQL), without the fingerprint blobs; Python confirms the
    # exact membership; blobs are read only for the newest revision of each repo.
    rows = session.execute(
        select(Repo.repo_id, Repo.family_bases, Revision.id, Revision.sha,
               Revision.created_at.label("uploaded_at"), Fingerprint.id.label("fp_id"))
        .join(Revision, Revision.repo_pk == Repo.id)
        .join(Fingerprint, Fingerprint.revision_id == Revision.id)
        .where(Fingerprint.analysis_version == analysis_version,
               Repo.repo_id != exclude_repo_id,
               cast(Repo.family_bases, String).contains(json.dumps(base_repo_id)))
        .order_by(Fingerprint.created_at.desc(), Fingerprint.id.desc())
    ).all()
    chosen: dict[str, Any] = {}
    for row in rows:
        if base_repo_id not in (row.family_bases or []) or row.repo_id in chosen:
            continue
        chosen[row.repo_id] = row
    blobs = {fid: (data, path) for fid, data, path in session.execute(
        select(Fingerprint.id, Fingerprint.data, Fingerprint.path)
        .where(Fingerprint.id.in_([r.fp_id for r in chosen.values()]))
    )} if chosen else {}
    out: list[StoredHomologue] = []
    for repo_id, row in chosen.items():
        data, path = blobs.get(row.fp_id, (None, None))
        if data is None and path:
            try:
                with open(path, "rb") as fh:
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


@dataclass(frozen=True)
class AuditTarget:
    audit_id: int
    revision_id: int
    repo_id: str
    sha: str
    base_repo_id: str | None
    analysis_version: str


def audit_target(session: Session, *, audit_id: int) -> AuditTarget:
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
