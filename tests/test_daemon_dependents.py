"""A merge audited while its parent was still being audited is audited again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from auditor.schema import (
    AuditReport,
    BackdoorInfo,
    LineageEntry,
    MergeInfo,
    ProtectionInfo,
    SubjectRef,
)
from auditor.store import catalog, dependents, queue
from auditor.store.dependents import requeue_dependents
from auditor.store.models import Audit

T0 = datetime(2025, 1, 1, tzinfo=UTC)
BASE = "org/base"


def _report(repo_id: str, compared: list[str]) -> AuditReport:
    return AuditReport(
        tool_version="t", analysis_version="1",
        subject=SubjectRef(repo_id=repo_id, revision="0" * 40),
        lineage=[LineageEntry(repo_id=c, relation="unrelated", cosine=0.0) for c in compared],
        merge=MergeInfo(is_merge=False), backdoor=BackdoorInfo(suspected=False),
        protection=ProtectionInfo(), findings=[],
    )


def _done(session: Session, repo_id: str, hours: int, compared: list[str]) -> int:
    catalog.upsert_repo(session, repo_id=repo_id, family_base=BASE)
    rev = catalog.upsert_revision(session, repo_id=repo_id, sha=f"{hours:040x}",
                               created_at=T0 + timedelta(hours=hours))
    audit_id = queue.queue_audit(session, revision_id=rev.id, analysis_version="1", config_hash="c")
    assert audit_id is not None
    claimed = queue.claim_next_audit(session, worker_id="w", lease_seconds=60)
    assert claimed is not None and claimed.id == audit_id
    catalog.save_fingerprint(session, revision_id=rev.id, analysis_version="1", data=b"fp")
    queue.complete_audit(session, audit_id=audit_id, report=_report(repo_id, compared),
                         worker_id="w")
    return rev.id


def test_later_audits_that_missed_a_parent_are_requeued(store_session: Session) -> None:
    alice = _done(store_session, "alice/ft", 1, ["bob/ft"])
    _done(store_session, "bob/ft", 2, ["alice/ft"])
    # The merge ran while carol was still running: it compared with alice and bob only.
    _done(store_session, "mallory/merge", 4, ["alice/ft", "bob/ft"])
    carol = _done(store_session, "carol/ft", 3, ["alice/ft", "bob/ft", "mallory/merge"])

    assert requeue_dependents(store_session, revision_id=carol, analysis_version="1") == [
        "mallory/merge"
    ]
    statuses = {a.revision.repo.repo_id: a.status for a in store_session.query(Audit)}
    assert statuses == {"alice/ft": "done", "bob/ft": "done", "carol/ft": "done",
                        "mallory/merge": "queued"}
    # Earlier uploads are never re-queued, and nothing that already compared with alice.
    assert requeue_dependents(store_session, revision_id=alice, analysis_version="1") == []


def test_an_audit_that_finishes_after_a_missed_parent_requeues_itself(
        store_session: Session) -> None:
    # carol (older) finished while the merge was running; the merge finishes last.
    _done(store_session, "alice/ft", 1, [])
    _done(store_session, "carol/ft", 3, ["alice/ft"])
    merge = _done(store_session, "mallory/merge", 4, ["alice/ft"])
    assert requeue_dependents(store_session, revision_id=merge, analysis_version="1") == [
        "mallory/merge"
    ]


def test_merge_of_a_later_flagged_parent_is_requeued_for_inheritance(
        store_session: Session) -> None:
    _done(store_session, "bob/ft", 1, [])
    # The merge saw evil's fingerprint but ran before evil's backdoor verdict was stored.
    merge_report = _report("victim/merge", ["evil/ft", "bob/ft"]).model_copy(update={
        "lineage": [LineageEntry(repo_id="evil/ft", relation="merge_parent", cosine=0.8),
                    LineageEntry(repo_id="bob/ft", relation="merge_parent", cosine=0.5)]})
    catalog.upsert_repo(store_session, repo_id="victim/merge", family_base=BASE)
    rev = catalog.upsert_revision(store_session, repo_id="victim/merge", sha="f" * 40,
                               created_at=T0 + timedelta(hours=5))
    audit_id = queue.queue_audit(store_session, revision_id=rev.id, analysis_version="1",
                                 config_hash="c")
    queue.claim_next_audit(store_session, worker_id="w", lease_seconds=60)
    catalog.save_fingerprint(store_session, revision_id=rev.id, analysis_version="1", data=b"fp")
    queue.complete_audit(store_session, audit_id=audit_id, report=merge_report, worker_id="w")

    evil = _done(store_session, "evil/ft", 2, ["bob/ft"])
    audit = store_session.query(Audit).filter(Audit.revision_id == evil).one()
    flagged = dict(audit.report)
    flagged["backdoor"] = {"suspected": True, "triggers": [], "inherited_from": []}
    audit.report = flagged
    store_session.commit()
    assert requeue_dependents(store_session, revision_id=evil, analysis_version="1") == [
        "victim/merge"
    ]


def test_stored_homologues_are_the_base_family_only(store_session: Session) -> None:
    _done(store_session, "alice/ft", 1, [])
    _done(store_session, "bob/ft", 2, [])
    # another base's family (its id contains this base's id as a prefix)
    catalog.upsert_repo(store_session, repo_id="carol/ft", family_base=BASE + "-2")
    rev = catalog.upsert_revision(store_session, repo_id="carol/ft", sha="f" * 40,
                                  created_at=T0)
    catalog.save_fingerprint(store_session, revision_id=rev.id, analysis_version="1",
                             data=b"other")
    got = catalog.stored_homologues(store_session, base_repo_id=BASE,
                                    exclude_repo_id="bob/ft", analysis_version="1")
    assert [h.repo_id for h in got] == ["alice/ft"]
    assert got[0].fingerprint == b"fp"


def test_dependents_query_reads_only_the_family(store_session: Session) -> None:
    from sqlalchemy import select

    from auditor.store.models import Repo

    catalog.upsert_repo(store_session, repo_id="a/in", family_base="org/base_1")
    catalog.upsert_repo(store_session, repo_id="a/like", family_base="org/baseX1")
    catalog.upsert_repo(store_session, repo_id="a/card", declared_base_models=["org/base_1"])
    catalog.upsert_repo(store_session, repo_id="a/none")
    store_session.commit()
    got = store_session.scalars(
        select(Repo.repo_id).where(dependents._in_family({"org/base_1"}))).all()
    # "_" is a LIKE wildcard: escaped, a look-alike base's repos are not loaded
    assert sorted(got) == ["a/card", "a/in"]
