"""Apply the owners' authorizations to stored audits (``auditor reevaluate``).

``authorize`` and ``unauthorize`` only change the grants; this re-evaluates every stored
finding against the current grants, in the report JSON and in the findings table alike.
Findings are kept: a covered one is marked suppressed ("authorized by OWNER on DATE"),
one whose grant was withdrawn becomes active again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from auditor.rules.authz import (
    AUTHORIZED_PREFIX,
    apply_to_report,
    authorization_matches,
    authorization_reason,
)
from auditor.schema import AuditReport
from auditor.store.models import Audit, Authorization


@dataclass(frozen=True)
class Grant:
    """A detached copy of an Authorization row (usable after the session closed)."""

    id: int
    owner: str
    subject: str
    related_repo: str | None
    note: str | None
    created_at: datetime


@dataclass(frozen=True)
class Reevaluation:
    audits: int  # done audits looked at
    changed: int  # audits whose findings changed
    suppressed: int  # findings suppressed by an authorization afterwards (all audits)
    active: int  # findings active afterwards (all audits)


def current_authorizations(session: Session) -> list[Grant]:
    rows = session.scalars(select(Authorization).order_by(Authorization.id))
    return [Grant(id=r.id, owner=r.owner, subject=r.subject, related_repo=r.related_repo,
                  note=r.note, created_at=r.created_at) for r in rows]


def authorize_report(session: Session, report: AuditReport) -> AuditReport:
    """``report`` with the store's current authorizations applied (used before saving)."""
    return apply_to_report(report, current_authorizations(session))


def reevaluate_stored(session: Session) -> Reevaluation:
    """Re-apply the current authorizations to every done audit; commits."""
    auths = current_authorizations(session)
    audits = list(session.scalars(select(Audit).where(Audit.status == "done")))
    changed = suppressed = active = 0
    for audit in audits:
        touched = False
        for row in audit.findings:
            auth = next((a for a in auths if authorization_matches(
                a, subject_repo=row.subject_repo, related_repo=row.related_repo)), None)
            if auth is not None:
                reason = authorization_reason(auth)
                if not row.suppressed or row.suppressed_reason != reason:
                    row.suppressed, row.suppressed_reason, touched = True, reason, True
            elif row.suppressed and (row.suppressed_reason or "").startswith(AUTHORIZED_PREFIX):
                row.suppressed, row.suppressed_reason, touched = False, None, True
            if row.suppressed:
                suppressed += 1
            else:
                active += 1
        if audit.report is not None:
            try:
                report = AuditReport.model_validate(audit.report)
            except ValidationError:
                report = None  # written by an older schema: the table rows still count
            if report is not None:
                updated = apply_to_report(report, auths)
                if updated is not report:
                    audit.report = updated.model_dump(mode="json")
                    touched = True
        changed += touched
    session.commit()
    return Reevaluation(audits=len(audits), changed=changed, suppressed=suppressed,
                        active=active)
