"""Whether an owner's authorization covers a finding, and applying the authorizations.

Shared by the rules engine (every audit), the store (every saved result) and
``auditor reevaluate`` (stored findings after ``authorize``/``unauthorize``). A covered
finding is kept, marked ``suppressed`` with "authorized by OWNER on DATE": never dropped,
so an owner who withdraws the grant gets the finding back.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from auditor.schema import AuditReport, Finding

# Every suppression written here starts with this; re-evaluation only touches those.
AUTHORIZED_PREFIX = "authorized by "


class AuthorizationLike(Protocol):
    """``owner`` allowed ``subject`` (a repo id or fnmatch pattern) to use their models;
    only ``related_repo`` when it is set. The store's Authorization rows fit."""

    @property
    def owner(self) -> str: ...

    @property
    def subject(self) -> str: ...

    @property
    def related_repo(self) -> str | None: ...

    @property
    def note(self) -> str | None: ...


def owner_of(repo_id: str) -> str:
    return repo_id.split("/", 1)[0] if "/" in repo_id else repo_id


def authorization_matches(
    auth: AuthorizationLike, *, subject_repo: str, related_repo: str | None
) -> bool:
    """True if ``auth`` covers ``subject_repo`` using ``related_repo``.

    Only the owner of the related repo can authorize its use, so a finding without a
    related repo (a backdoor, a pickle) is never covered.
    """
    if not related_repo or owner_of(related_repo) != auth.owner:
        return False
    if auth.related_repo and auth.related_repo != related_repo:
        return False
    return auth.subject == subject_repo or fnmatch.fnmatchcase(subject_repo, auth.subject)


def authorization_reason(auth: AuthorizationLike) -> str:
    """"authorized by carol on 2026-11-30 (sneaky/* may use models of carol): note"."""
    created = getattr(auth, "created_at", None)
    when = f" on {created:%Y-%m-%d}" if isinstance(created, datetime) else ""
    scope = auth.related_repo or f"models of {auth.owner}"
    reason = f"{AUTHORIZED_PREFIX}{auth.owner}{when} ({auth.subject} may use {scope})"
    return reason + (f": {auth.note}" if auth.note else "")


def apply_authorizations(
    findings: Sequence[Finding], *, subject_repo: str,
    authorizations: Sequence[AuthorizationLike],
) -> list[Finding]:
    """Every finding, suppressed exactly when a current authorization covers it.

    A finding suppressed by an authorization that no longer exists is active again;
    suppressions of another origin are left as they are.
    """
    out: list[Finding] = []
    for finding in findings:
        auth = next((a for a in authorizations if authorization_matches(
            a, subject_repo=subject_repo, related_repo=finding.related_repo)), None)
        if auth is not None:
            finding = finding.model_copy(update={
                "suppressed": True, "suppressed_reason": authorization_reason(auth)})
        elif finding.suppressed and (finding.suppressed_reason or "").startswith(
                AUTHORIZED_PREFIX):
            finding = finding.model_copy(update={"suppressed": False, "suppressed_reason": None})
        out.append(finding)
    return out


def apply_to_report(
    report: AuditReport, authorizations: Sequence[AuthorizationLike]
) -> AuditReport:
    """``report`` with its findings' suppression recomputed (the findings all kept)."""
    findings = apply_authorizations(report.findings, subject_repo=report.subject.repo_id,
                                    authorizations=authorizations)
    if findings == report.findings:
        return report
    return report.model_copy(update={"findings": findings})
