"""Read what the static site shows out of the store (``auditor/store``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydantic import ValidationError

from auditor.reports.site import RepoMeta, SiteData, WatchedBase
from auditor.schema import AuditReport

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def site_data_from_store(session: Session) -> SiteData:
    """Watched bases with their known derivatives, each repo's latest done audit, repo facts."""
    from sqlalchemy import select

    from auditor.store import catalog, policy, queries
    from auditor.store.models import Repo

    latest: dict[str, AuditReport] = {}
    # Newest first; a repo with several audited revisions shows its newest audit.
    for audit in queries.latest_done_audits(session):
        try:
            report = queries.audit_report(audit)
        except ValidationError:
            continue  # a report written by an older schema: skipped rather than break the site
        if report is not None:
            latest.setdefault(report.subject.repo_id, report)

    repos = list(session.scalars(select(Repo).order_by(Repo.repo_id)))
    metas = [
        RepoMeta(
            repo_id=r.repo_id,
            owner=r.owner,
            created_at=r.created_at,
            declared_bases=[str(b) for b in (r.declared_base_models or [])],
        )
        for r in repos
    ]
    bases = []
    for watched in policy.watch_list(session):
        derivatives = [
            r.repo_id for r in repos
            if watched.repo_id in catalog.family_of(r) and r.repo_id != watched.repo_id
        ]
        bases.append(WatchedBase(repo_id=watched.repo_id, derivatives=derivatives))
    return SiteData(
        bases=bases,
        audits=list(reversed(latest.values())),  # SiteData wants oldest first
        repos=metas,
        generated_at=datetime.now(UTC),
    )
