"""Provenance of derivatives (how each was found) and the discovery state per base."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from auditor.rules.authz import owner_of
from auditor.store.db import begin_write
from auditor.store.models import DiscoveryState, Provenance, utcnow

FOUND_BY = ("declared", "family_tree", "discovered")


def record_provenance(
    session: Session,
    *,
    repo_id: str,
    base_repo_id: str,
    found_by: str,
    sha: str | None = None,
    evidence: Mapping[str, Any] | None = None,
) -> Provenance:
    """Create or refresh the record that ``repo_id`` was found under ``base_repo_id`` by
    ``found_by``; new evidence replaces the old (a new revision was probed)."""
    if found_by not in FOUND_BY:
        raise ValueError(f"found_by must be one of {FOUND_BY}, not {found_by!r}")
    begin_write(session)
    row = session.scalar(select(Provenance).where(
        Provenance.repo_id == repo_id, Provenance.base_repo_id == base_repo_id,
        Provenance.found_by == found_by))
    if row is None:
        row = Provenance(repo_id=repo_id, base_repo_id=base_repo_id, found_by=found_by,
                         evidence={})
        session.add(row)
    if sha is not None:
        row.sha = sha
    if evidence is not None:
        row.evidence = dict(evidence)
    row.updated_at = utcnow()
    session.commit()
    return row


def provenance_of(session: Session, *, repo_id: str) -> list[Provenance]:
    rows = list(session.scalars(select(Provenance).where(Provenance.repo_id == repo_id)
                                .order_by(Provenance.base_repo_id, Provenance.found_by)))
    session.rollback()
    return rows


def derivatives_of(session: Session, *, base_repo_id: str) -> dict[str, list[Provenance]]:
    """repo id -> its provenance rows under ``base_repo_id``."""
    out: dict[str, list[Provenance]] = {}
    for row in session.scalars(select(Provenance)
                               .where(Provenance.base_repo_id == base_repo_id)
                               .order_by(Provenance.repo_id, Provenance.found_by)):
        out.setdefault(row.repo_id, []).append(row)
    session.rollback()
    return out


def discovered_only(session: Session, *, base_repo_id: str | None = None,
                    owner: str | None = None) -> list[Provenance]:
    """Derivatives found from their weights and not through their card or family tree:
    the ones nothing else would have listed."""
    query = select(Provenance)
    if base_repo_id is not None:
        query = query.where(Provenance.base_repo_id == base_repo_id)
    rows = list(session.scalars(query.order_by(Provenance.repo_id)))
    session.rollback()
    ways: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        ways.setdefault((r.repo_id, r.base_repo_id), set()).add(r.found_by)
    return [r for r in rows if r.found_by == "discovered"
            and ways[(r.repo_id, r.base_repo_id)] == {"discovered"}
            and (owner is None or owner_of(r.repo_id) == owner)]


def get_state(session: Session, *, base_repo_id: str) -> DiscoveryState | None:
    return session.scalar(select(DiscoveryState)
                          .where(DiscoveryState.base_repo_id == base_repo_id))


def set_state(
    session: Session,
    *,
    base_repo_id: str,
    listed_until: datetime | None = None,
    tree_resume: str | None = None,
) -> DiscoveryState:
    """Move the discovery cursor (fields given); ``tree_resume=""`` clears it."""
    begin_write(session)
    state = get_state(session, base_repo_id=base_repo_id)
    if state is None:
        state = DiscoveryState(base_repo_id=base_repo_id)
        session.add(state)
    if listed_until is not None:
        state.listed_until = listed_until
    if tree_resume is not None:
        state.tree_resume = tree_resume or None
    state.updated_at = utcnow()
    session.commit()
    return state


__all__ = ["FOUND_BY", "derivatives_of", "discovered_only", "get_state", "provenance_of",
           "record_provenance", "set_state"]
