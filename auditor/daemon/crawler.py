"""List the derivatives of a watched base and queue an audit for every new revision.

Two listings, both newest first and both stopping at the stored cursor:

* by creation date (``HubClient.list_derivatives``) back to the newest ``createdAt`` seen
  by the last successful crawl: new repos;
* by last modification back to the last successful crawl (minus a margin for clock
  skew): new commits of repos created before the cursor.

Every listed repo's current sha is compared with the stored revisions; new ones are
recorded and queued. The cursor moves only after everything listed is recorded, so a
crash mid-crawl lists the same repos again and the unique keys (repo id, revision sha,
audit key) make that a no-op.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from auditor import ANALYSIS_VERSION
from auditor.daemon import metrics
from auditor.errors import AuditorError
from auditor.hub.client import HubClient, RepoSummary
from auditor.store import catalog, policy, queue

if TYPE_CHECKING:
    from auditor.settings import Settings

log = logging.getLogger(__name__)

# How far before the last successful crawl the "modified since" listing reaches back:
# Hub timestamps come from another clock, and re-listing a repo is harmless.
MODIFIED_MARGIN = timedelta(hours=1)
# Merges and further fine-tunes declare their parents, not the base, so the crawl walks
# the family tree (children of every known member); this bounds the listings per crawl.
MAX_TREE_LISTINGS = 200


@dataclass
class CrawlResult:
    base_repo_id: str
    listed: int = 0
    new_repos: list[str] = field(default_factory=list)
    new_revisions: list[tuple[str, str]] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _list_modified(client: HubClient, base_repo_id: str) -> Iterator[RepoSummary]:
    """Derivatives of ``base_repo_id`` by last modification, newest first."""
    return client.list_derivatives(base_repo_id, sort="last_modified")


def _skip_reason(summary: RepoSummary, *, has_token: bool) -> str | None:
    if summary.private:
        # Reports are public: a private repo visible to our token is not ours to publish.
        return "private repo"
    if summary.gated and not has_token:
        return f"gated repo ({summary.gated}): needs accepted terms and a token"
    return None


def crawl_base(
    session: Session,
    client: HubClient,
    base_repo_id: str,
    *,
    config_hash: str,
    analysis_version: str = ANALYSIS_VERSION,
    progress: Callable[[str], None] | None = None,
) -> CrawlResult:
    """Crawl one base: record and queue every new derivative revision.

    Hub errors are recorded on the cursor (which then stays where it was) and returned
    in ``CrawlResult.error``; they never raise.
    """
    result = CrawlResult(base_repo_id=base_repo_id)
    cursor = catalog.get_cursor(session, base_repo_id=base_repo_id)
    stop_created = cursor.last_created_at if cursor else None
    last_success = cursor.last_success_at if cursor else None
    session.rollback()
    newest_created: datetime | None = None
    newest_sha: str | None = None
    seen: set[str] = set()
    has_token = bool(client.auth_headers())
    # Three listings feed one recorder: new repos, new commits, the family tree.
    record = functools.partial(_record, session, base_repo_id=base_repo_id, result=result,
                               config_hash=config_hash, analysis_version=analysis_version,
                               has_token=has_token, progress=progress)
    try:
        for summary in client.list_derivatives(base_repo_id):
            if stop_created is not None and summary.created_at is not None \
                    and summary.created_at < stop_created:
                break  # older than everything the last crawl saw: known ground
            if newest_created is None and summary.created_at is not None:
                newest_created, newest_sha = summary.created_at, summary.sha
            seen.add(summary.repo_id)
            record(summary)
        if last_success is not None:
            since = last_success - MODIFIED_MARGIN
            for summary in _list_modified(client, base_repo_id):
                if summary.last_modified is not None and summary.last_modified < since:
                    break
                if summary.repo_id in seen:
                    continue
                seen.add(summary.repo_id)
                record(summary)
        _walk_tree(session, client, base_repo_id, seen=seen, record=record)
    except AuditorError as exc:
        result.error = str(exc)
        session.rollback()
        catalog.set_cursor(session, base_repo_id=base_repo_id, error=result.error)
        metrics.CRAWL_FAILURES.labels(base=base_repo_id).inc()
        log.warning("crawl failed base=%s error=%s listed=%d", base_repo_id, exc,
                    result.listed)
        return result
    result.listed = len(seen)
    # Only now: every listed revision is recorded and queued.
    catalog.set_cursor(session, base_repo_id=base_repo_id, last_created_at=newest_created,
                          last_sha=newest_sha)
    metrics.CRAWL_SUCCESS.labels(base=base_repo_id).set(time.time())
    log.info("crawl done base=%s listed=%d new_repos=%d new_revisions=%d queued=%d "
             "skipped=%d", base_repo_id, result.listed, len(result.new_repos),
             len(result.new_revisions), len(result.queued), len(result.skipped))
    return result


def declared_lineage(tags: list[str]) -> tuple[list[str], str | None]:
    """What the model card declares, read back from the Hub's lineage tags:
    ``base_model:ORG/NAME`` and ``base_model:{relation}:ORG/NAME``."""
    bases: list[str] = []
    relation: str | None = None
    for tag in tags:
        if not tag.startswith("base_model:"):
            continue
        rest = tag.split(":", 1)[1]
        if ":" in rest:
            relation = relation or rest.split(":", 1)[0]
        elif rest not in bases:
            bases.append(rest)
    return bases, relation


def family_members(session: Session, base_repo_id: str) -> list[str]:
    """Repos recorded as derivatives of ``base_repo_id`` (at any depth), oldest first."""
    from sqlalchemy import select

    from auditor.store.models import Repo

    rows = session.execute(
        select(Repo.repo_id, Repo.family_bases).order_by(Repo.created_at, Repo.id)
    ).all()
    session.rollback()
    # JSON containment is not portable across SQLite / PostgreSQL: filter here.
    return [r.repo_id for r in rows if base_repo_id in (r.family_bases or [])]


def _walk_tree(
    session: Session,
    client: HubClient,
    base_repo_id: str,
    *,
    seen: set[str],
    record: Callable[[RepoSummary], None],
) -> None:
    """List the children of every family member (breadth first) and record new ones.

    Every member is listed on each crawl, because a merge of an old fine-tune is a new
    child of an old repo; re-recording a known revision is a no-op.
    """
    frontier = [m for m in family_members(session, base_repo_id) if m != base_repo_id]
    listed: set[str] = set()
    while frontier and len(listed) < MAX_TREE_LISTINGS:
        parent = frontier.pop(0)
        if parent in listed:
            continue
        listed.add(parent)
        for summary in client.list_derivatives(parent):
            if summary.repo_id in seen or summary.repo_id == base_repo_id:
                continue
            seen.add(summary.repo_id)
            record(summary)
            frontier.append(summary.repo_id)


def _record(
    session: Session,
    summary: RepoSummary,
    *,
    base_repo_id: str,
    result: CrawlResult,
    config_hash: str,
    analysis_version: str,
    has_token: bool,
    progress: Callable[[str], None] | None,
) -> None:
    """Record one listed repo's current revision and queue (or skip) its audit."""
    if progress is not None:
        progress(summary.repo_id)
    if not summary.sha:
        log.warning("listed repo without a sha repo=%s base=%s", summary.repo_id, base_repo_id)
        return
    known = catalog.get_repo(session, repo_id=summary.repo_id)
    reason = _skip_reason(summary, has_token=has_token)
    declared, relation = declared_lineage(summary.tags)
    if known is None:
        result.new_repos.append(summary.repo_id)
    catalog.upsert_repo(
        session, repo_id=summary.repo_id, declared_base_models=declared,
        declared_relation=relation, family_base=base_repo_id,
        gated=bool(summary.gated), private=summary.private,
        # "" clears a stale reason when a repo stops being gated.
        skip_reason=reason or "",
    )
    existing = catalog.get_revision(session, repo_id=summary.repo_id, sha=summary.sha)
    revision = catalog.upsert_revision(session, repo_id=summary.repo_id, sha=summary.sha,
                                          created_at=summary.last_modified or summary.created_at)
    if existing is None:
        result.new_revisions.append((summary.repo_id, summary.sha))
    audit_id = queue.queue_audit(session, revision_id=revision.id,
                                 analysis_version=analysis_version,
                                      config_hash=config_hash)
    if audit_id is None:
        return  # already queued, running, done or skipped
    if reason is not None:
        queue.skip_audit(session, audit_id=audit_id, reason=reason)
        result.skipped[summary.repo_id] = reason
        log.info("skipped repo=%s sha=%s reason=%r", summary.repo_id, summary.sha[:12], reason)
        return
    result.queued.append(audit_id)
    log.info("queued repo=%s sha=%s audit=%d", summary.repo_id, summary.sha[:12], audit_id)


def crawl_all(
    session: Session,
    client: HubClient,
    settings: Settings,
    *,
    progress: Callable[[str, str], None] | None = None,
) -> list[CrawlResult]:
    """Crawl every watched base once (``progress(base, repo_id)`` per listed repo)."""
    from auditor.settings import analysis_config_hash

    config_hash = analysis_config_hash(settings)
    bases = [w.repo_id for w in policy.watch_list(session)]
    session.rollback()
    results = []
    for base in bases:
        def report(repo_id: str, base: str = base) -> None:
            if progress is not None:
                progress(base, repo_id)

        results.append(crawl_base(session, client, base, config_hash=config_hash,
                                  progress=report))
    return results
