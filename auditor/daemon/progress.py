"""Progress lines for a crawl-and-audit cycle: which repo was audited, out of how many.

The total grows while audits run (a finished parent re-queues its merges, a crawl finds
more), so it is read again after every audit: done so far plus what is still queued or
running. It can never show "22/10".
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from auditor.store.models import Audit, Repo, Revision
from auditor.store.queries import pending_count


@dataclass(frozen=True)
class AuditTick:
    repo_id: str | None  # the audit that just finished (None if it could not be read)
    status: str | None  # done, failed, skipped (queued again: a retry)
    done: int  # audits finished in this cycle
    total: int  # done + still queued or running


def last_finished(session: Session) -> tuple[str | None, str | None]:
    row = session.execute(
        select(Repo.repo_id, Audit.status)
        .join(Revision, Revision.id == Audit.revision_id)
        .join(Repo, Repo.id == Revision.repo_pk)
        .where(Audit.finished_at.is_not(None))
        .order_by(Audit.finished_at.desc(), Audit.id.desc())
        .limit(1)
    ).first()
    session.rollback()
    return (row[0], row[1]) if row else (None, None)


class AuditCounter:
    """``on_done`` for the worker pool: calls ``report`` with an ``AuditTick``."""

    def __init__(self, factory: sessionmaker[Session],
                 report: Callable[[AuditTick], None]) -> None:
        self.factory = factory
        self.report = report
        self.done = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.done += 1
            with self.factory() as session:
                repo_id, status = last_finished(session)
                pending = pending_count(session)
            self.report(AuditTick(repo_id=repo_id, status=status, done=self.done,
                                  total=self.done + pending))


def tick_line(tick: AuditTick) -> str:
    """'audited alice/model (3/10)'."""
    verb = {"failed": "failed", "skipped": "skipped"}.get(tick.status or "", "audited")
    return f"{verb} {tick.repo_id or '?'} ({tick.done}/{tick.total})"
