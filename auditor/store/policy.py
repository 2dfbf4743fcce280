"""Policy: the watched bases and the owners' authorizations."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from auditor.errors import StoreError
from auditor.rules.authz import authorization_matches, owner_of
from auditor.store.db import begin_write
from auditor.store.models import (
    Authorization,
    WatchedBase,
)


def watch_add(session: Session, *, repo_id: str,
              note: str | None = None) -> WatchedBase:
    begin_write(session)
    row = session.scalar(select(WatchedBase).where(WatchedBase.repo_id == repo_id))
    if row is None:
        row = WatchedBase(repo_id=repo_id, note=note)
        session.add(row)
    elif note is not None:
        row.note = note
    session.commit()
    return row


def watch_remove(session: Session, *, repo_id: str) -> bool:
    begin_write(session)
    row = session.scalar(select(WatchedBase).where(WatchedBase.repo_id == repo_id))
    if row is None:
        return False
    session.delete(row)
    session.commit()
    return True


def watch_list(session: Session) -> list[WatchedBase]:
    return list(session.scalars(select(WatchedBase).order_by(WatchedBase.repo_id)))


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


def remove_authorization(session: Session, *, authorization_id: int) -> bool:
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
