"""List the derivatives of a watched base and queue an audit for every new revision.

Two listings, both newest first and both stopping at the stored cursor:

* by creation date (``HubClient.list_derivatives``) back to the newest ``createdAt`` seen
  by the last successful crawl: new repos;
* by last modification back to the last successful crawl (minus a margin for clock
  skew): new commits of repos created before the cursor.

then the family tree (children of known members, bounded per crawl, newest members first,
resuming where the last crawl's walk stopped), then weight-based discovery
(``auditor.daemon.discovery``): new uploads of the base's architecture whose weights are
close to the base's, whatever their cards say. Each repo is recorded with its provenance
(declared, family_tree, discovered).

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
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from auditor import ANALYSIS_VERSION
from auditor.daemon import metrics
from auditor.errors import AuditorError
from auditor.hub.client import HubClient, RepoSummary
from auditor.store import catalog, policy, provenance, queue

if TYPE_CHECKING:
    from auditor.settings import Settings

log = logging.getLogger(__name__)

# How far before the last successful crawl the "modified since" listing reaches back:
# Hub timestamps come from another clock, and re-listing a repo is harmless.
MODIFIED_MARGIN = timedelta(hours=1)
# Merges and further fine-tunes declare their parents, not the base, so the crawl walks
# the family tree (children of every known member); this bounds the listings per crawl.
MAX_TREE_LISTINGS = 200
# Share of the tree budget spent on the newest members before resuming the rotation.
NEWEST_SHARE = 4


@dataclass
class CrawlResult:
    base_repo_id: str
    listed: int = 0
    new_repos: list[str] = field(default_factory=list)
    new_revisions: list[tuple[str, str]] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    discovered: list[str] = field(default_factory=list)
    examined: int = 0
    discovery_note: str | None = None
    tree_listed: int = 0
    examinations: list[Any] = field(default_factory=list)  # discovery.Examination
    undecided: dict[str, str] = field(default_factory=dict)  # discovery could not tell

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
    discovery: bool = True,
    tree_budget: int = MAX_TREE_LISTINGS,
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
            record(summary, found_by="declared")
        if last_success is not None:
            since = last_success - MODIFIED_MARGIN
            for summary in _list_modified(client, base_repo_id):
                if summary.last_modified is not None and summary.last_modified < since:
                    break
                if summary.repo_id in seen:
                    continue
                seen.add(summary.repo_id)
                record(summary, found_by="declared")
        resume = _walk_tree(session, client, base_repo_id, seen=seen, record=record,
                            budget=tree_budget, result=result)
        listed_until = _discover(session, client, base_repo_id, seen=seen, record=record,
                                 result=result) if discovery else None
        if not seen:
            # An empty listing is also what a missing base gives: say which it is.
            client.resolve(base_repo_id)
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
    provenance.set_state(session, base_repo_id=base_repo_id, listed_until=listed_until,
                         tree_resume=resume or "")
    metrics.CRAWL_SUCCESS.labels(base=base_repo_id).set(time.time())
    log.info("crawl done base=%s listed=%d new_repos=%d new_revisions=%d queued=%d "
             "skipped=%d examined=%d discovered=%d tree_listed=%d", base_repo_id,
             result.listed, len(result.new_repos), len(result.new_revisions),
             len(result.queued), len(result.skipped), result.examined,
             len(result.discovered), result.tree_listed)
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
    """Repos recorded as derivatives of ``base_repo_id`` (at any depth), newest first by
    their newest revision's Hub time (recording time when unknown)."""
    from sqlalchemy import func, select

    from auditor.store.models import Repo, Revision

    newest = (select(Revision.repo_pk, func.max(Revision.created_at).label("hub_time"))
              .group_by(Revision.repo_pk).subquery())
    rows = session.execute(
        select(Repo.repo_id, Repo.family_bases, Repo.created_at, newest.c.hub_time)
        .outerjoin(newest, newest.c.repo_pk == Repo.id)
    ).all()
    session.rollback()
    # JSON containment is not portable across SQLite / PostgreSQL: filter here.
    members = [r for r in rows if base_repo_id in (r.family_bases or [])]
    members.sort(key=lambda r: (r.hub_time or r.created_at, r.repo_id), reverse=True)
    return [r.repo_id for r in members]


def _walk_tree(
    session: Session,
    client: HubClient,
    base_repo_id: str,
    *,
    seen: set[str],
    record: Callable[..., None],
    budget: int,
    result: CrawlResult,
) -> str | None:
    """List the children of family members and record new ones; returns where to resume.

    Every member must be listed now and then, because a merge of an old fine-tune is a new
    child of an old repo. At most ``budget`` listings per crawl, fairly: first the newest
    members (and children found on the way), then a rotation through all members that
    resumes where the last crawl stopped. Re-recording a known revision is a no-op.
    """
    members = [m for m in family_members(session, base_repo_id) if m != base_repo_id]
    state = provenance.get_state(session, base_repo_id=base_repo_id)
    resume = state.tree_resume if state else None
    session.rollback()
    start = members.index(resume) if resume in members else 0
    rotation = members[start:] + members[:start]
    priority = members[: max(1, budget // NEWEST_SHARE)]
    listed: set[str] = set()
    known = set(members)

    def list_children(parent: str) -> None:
        listed.add(parent)
        for summary in client.list_derivatives(parent):
            if summary.repo_id in seen or summary.repo_id == base_repo_id:
                continue
            seen.add(summary.repo_id)
            record(summary, found_by="family_tree")
            if summary.repo_id not in known:
                known.add(summary.repo_id)
                priority.append(summary.repo_id)  # new members are the newest

    while priority and len(listed) < budget:
        parent = priority.pop(0)
        if parent not in listed:
            list_children(parent)
    next_resume: str | None = None
    for parent in rotation:
        if parent in listed:
            continue
        if len(listed) >= budget:
            next_resume = parent
            break
        list_children(parent)
    result.tree_listed = len(listed)
    return next_resume


def _discover(
    session: Session,
    client: HubClient,
    base_repo_id: str,
    *,
    seen: set[str],
    record: Callable[..., None],
    result: CrawlResult,
) -> datetime | None:
    """Weight-based discovery; returns the new discovery cursor (None: unchanged)."""
    from auditor.daemon import discovery as disc
    from auditor.errors import WeightsError

    state = provenance.get_state(session, base_repo_id=base_repo_id)
    since = state.listed_until if state else None
    known = set(family_members(session, base_repo_id))
    session.rollback()
    try:
        profile = disc.load_base_profile(client, base_repo_id)
    except WeightsError as exc:
        result.discovery_note = f"discovery skipped: the base's weights are unreadable ({exc})"
        log.warning("%s base=%s", result.discovery_note, base_repo_id)
        return None
    try:
        found = disc.discover(
            client, profile, since=since,
            skip=lambda s: s.repo_id in seen or s.repo_id in known,
            on_found=lambda s, exam: (record(s, found_by="discovered",
                                             evidence=exam.evidence),
                                      result.discovered.append(s.repo_id)),
            # Screening compares with the newest known members (the newest first).
            homologues=[m for m in family_members(session, base_repo_id)
                        if m != base_repo_id][: disc.MAX_HOMOLOGUES],
        )
    finally:
        profile.close()
    result.examined = len(found.examined)
    result.examinations = found.examined
    undecided = [e for e in found.examined if e.related is None]
    result.undecided = {e.repo_id: e.reason for e in undecided}
    if any(e.retry for e in undecided):
        # Leave the cursor where these will be listed again next crawl.
        result.discovery_note = f"{len(undecided)} candidates could not be probed"
        return since
    return found.newest_created


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
    found_by: str = "declared",
    evidence: dict[str, Any] | None = None,
) -> None:
    """Record one listed repo's current revision, how it was found, and queue (or skip)
    its audit."""
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
    provenance.record_provenance(session, repo_id=summary.repo_id, base_repo_id=base_repo_id,
                                 found_by=found_by, sha=summary.sha,
                                 evidence=evidence if evidence is not None
                                 else {"tags": [t for t in summary.tags
                                                if t.startswith("base_model:")]})
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
