"""Re-queue the done audits of a family that ran with an incomplete comparison set.

Workers run in parallel, so an audit may read the store while an earlier upload of its
family is still being audited (see ``requeue_dependents``).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Text, cast, or_, select, update
from sqlalchemy.orm import Session

from auditor.store.catalog import family_of
from auditor.store.db import begin_write
from auditor.store.models import Audit, Fingerprint, Repo, Revision, utcnow

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
