"""Read what the static site shows out of the store (``auditor/store``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydantic import ValidationError

from auditor.reports.site import Discovered, RepoMeta, SiteData, WatchedBase
from auditor.schema import AuditReport

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def site_data_from_store(session: Session, *, hub_url: str = "https://huggingface.co",
                         site_url: str | None = None) -> SiteData:
    """Watched bases with their known derivatives, each repo's latest done audit, repo facts."""
    from sqlalchemy import select

    from auditor.store import catalog, policy, queries
    from auditor.store.models import Repo

    latest: dict[str, AuditReport] = {}
    audited_at: dict[str, datetime] = {}
    # Newest first; a repo with several audited revisions shows its newest audit.
    for audit in queries.latest_done_audits(session):
        try:
            report = queries.audit_report(audit)
        except ValidationError:
            continue  # a report written by an older schema: skipped rather than break the site
        if report is not None and report.subject.repo_id not in latest:
            latest[report.subject.repo_id] = report
            if audit.finished_at is not None:
                audited_at[report.subject.repo_id] = audit.finished_at

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
        bases.append(WatchedBase(repo_id=watched.repo_id, derivatives=derivatives,
                                 discovered=_discovered(session, watched.repo_id)))
    return SiteData(
        bases=bases,
        audits=list(reversed(latest.values())),  # SiteData wants oldest first
        repos=metas,
        generated_at=datetime.now(UTC),
        audited_at=audited_at,
        hub_url=hub_url,
        site_url=site_url,
    )


def _discovered(session: Session, base_repo_id: str) -> list[Discovered]:
    """Derivatives of the base found from their weights, with their cards' claims."""
    from auditor.store import provenance

    out = []
    for repo_id, rows in provenance.derivatives_of(session, base_repo_id=base_repo_id).items():
        found = next((r for r in rows if r.found_by == "discovered"), None)
        if found is None:
            continue
        ev = found.evidence or {}
        card = ev.get("card") or {}
        if not card.get("present", True):
            says = "no model card"
        elif card.get("base_models"):
            says = f"{card.get('relation') or 'base'}: {', '.join(map(str, card['base_models']))}"
        else:
            says = "card without a base"
        probe = ev.get("probe") or {}
        distance = probe.get("relative_distance")
        out.append(Discovered(
            repo_id=repo_id, also=[r.found_by for r in rows if r.found_by != "discovered"],
            distance=float(distance) if isinstance(distance, int | float) else None,
            card=says))
    return out
