"""The store's queue, history, fingerprints, cursors, authorizations and queries,
on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from auditor.errors import StoreError
from auditor.schema import (
    AuditReport,
    BackdoorInfo,
    BarrierCurve,
    Finding,
    LineageEntry,
    MergeInfo,
    ProtectionInfo,
    Severity,
    SubjectRef,
)
from auditor.store import catalog, policy, queries, queue
from auditor.store.models import Audit, Comparison, FindingRow


def make_report(repo_id: str = "eve/merged", *, analysis_version: str = "1") -> AuditReport:
    return AuditReport(
        tool_version="0.1.0",
        analysis_version=analysis_version,
        subject=SubjectRef(repo_id=repo_id, revision="a" * 40, owner=repo_id.split("/")[0]),
        lineage=[
            LineageEntry(
                repo_id="alice/model",
                relation="merge_parent",
                coefficient=0.4,
                cosine=0.61,
                p_value=1e-9,
            ),
            LineageEntry(
                repo_id="base/model", relation="finetune_parent", cosine=0.9, declared=True
            ),
        ],
        merge=MergeInfo(is_merge=True, method="linear"),
        backdoor=BackdoorInfo(suspected=False),
        protection=ProtectionInfo(merge_resistant=False),
        barriers=[
            BarrierCurve(
                other_repo_id="alice/model",
                alphas=[0, 0.5, 1],
                losses=[1.0, 1.1, 1.0],
                barrier=0.1,
                relative_barrier=0.1,
            )
        ],
        findings=[
            Finding(
                rule_id="AUD101",
                severity=Severity.HIGH,
                title="Undeclared merge",
                message="eve/merged merges alice/model",
                related_repo="alice/model",
                evidence={"cosine": 0.61},
            ),
            Finding(
                rule_id="AUD401",
                severity=Severity.INFO,
                title="Mergeable",
                message="mergeable",
                suppressed=True,
                suppressed_reason="test",
            ),
        ],
    )


def _revision(session: Session, repo_id: str = "eve/merged", sha: str = "a" * 40) -> int:
    return catalog.upsert_revision(
        session,
        repo_id=repo_id,
        sha=sha,
        created_at=datetime(2025, 1, 2, tzinfo=UTC),
        files=[{"path": "model.safetensors", "size": 1234}],
        formats=["safetensors"],
    ).id


def test_repos_and_revisions_upsert(store_session: Session) -> None:
    r = catalog.upsert_repo(
        store_session,
        repo_id="eve/merged",
        declared_base_models=["base/model"],
        declared_relation="merge",
        gated=False,
    )
    assert r.owner == "eve"
    again = catalog.upsert_repo(store_session, repo_id="eve/merged", gated=True,
                                skip_reason="gated")
    assert again.id == r.id and again.gated and again.declared_base_models == ["base/model"]
    rev1 = _revision(store_session)
    rev2 = _revision(store_session)
    assert rev1 == rev2
    got = catalog.get_revision(store_session, repo_id="eve/merged", sha="a" * 40)
    assert got is not None and got.files == [{"path": "model.safetensors", "size": 1234}]
    assert got.created_at == datetime(2025, 1, 2, tzinfo=UTC)


def test_watch_list(store_session: Session) -> None:
    policy.watch_add(store_session, repo_id="base/model", note="popular")
    policy.watch_add(store_session, repo_id="base/model")
    policy.watch_add(store_session, repo_id="base/other")
    assert [w.repo_id for w in policy.watch_list(store_session)] == ["base/model", "base/other"]
    assert policy.watch_remove(store_session, repo_id="base/other")
    assert not policy.watch_remove(store_session, repo_id="base/other")
    assert [w.note for w in policy.watch_list(store_session)] == ["popular"]


def test_queue_dedupe(store_session: Session) -> None:
    rev = _revision(store_session)
    first = queue.queue_audit(store_session, revision_id=rev, analysis_version="1",
                              config_hash="c1")
    assert first is not None
    # queued, running and done equivalents all block a duplicate
    assert queue.queue_audit(store_session, revision_id=rev, analysis_version="1",
                             config_hash="c1") is None
    claimed = queue.claim_next_audit(store_session, worker_id="w1", lease_seconds=60)
    assert claimed is not None and claimed.id == first
    assert queue.queue_audit(store_session, revision_id=rev, analysis_version="1",
                             config_hash="c1") is None
    queue.complete_audit(store_session, audit_id=first, report=make_report(), worker_id="w1")
    assert queue.queue_audit(store_session, revision_id=rev, analysis_version="1",
                             config_hash="c1") is None
    # another configuration is another audit
    assert queue.queue_audit(store_session, revision_id=rev, analysis_version="1",
                             config_hash="c2") is not None
    assert store_session.scalar(select(Audit.id).where(Audit.config_hash == "c1")) == first
    # the database itself refuses a duplicate row
    store_session.add(Audit(revision_id=rev, analysis_version="1", config_hash="c1"))
    with pytest.raises(IntegrityError):
        store_session.commit()
    store_session.rollback()


def test_claims_follow_upload_order(store_session: Session) -> None:
    # Queued newest first (as a crawl lists them), claimed oldest upload first, so a
    # merge's parents are audited (and fingerprinted) before the merge itself.
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    ids = {}
    for i, name in enumerate(["o/merge", "o/parent-b", "o/parent-a"]):
        rev = catalog.upsert_revision(store_session, repo_id=name, sha=f"{i:040x}",
                                   created_at=t0 - timedelta(hours=i))
        ids[name] = queue.queue_audit(store_session, revision_id=rev.id, analysis_version="1",
                                     config_hash="c")
    order = []
    while (audit := queue.claim_next_audit(store_session, worker_id="w", lease_seconds=60)):
        order.append(audit.id)
    assert order == [ids["o/parent-a"], ids["o/parent-b"], ids["o/merge"]]


def test_complete_stores_report_comparisons_findings(store_session: Session) -> None:
    rev = _revision(store_session)
    audit_id = queue.queue_audit(store_session, revision_id=rev, analysis_version="1",
                                 config_hash="c")
    assert audit_id is not None
    assert queue.claim_next_audit(store_session, worker_id="w", lease_seconds=60) is not None
    report = make_report()
    queue.complete_audit(store_session, audit_id=audit_id, report=report, worker_id="w")
    queue.complete_audit(store_session, audit_id=audit_id, report=report)  # idempotent

    audit = queries.get_audit(store_session, audit_id=audit_id)
    assert audit is not None and audit.status == "done" and audit.finished_at is not None
    assert queries.audit_report(audit) == report
    comparisons = store_session.scalars(select(Comparison).order_by(Comparison.id)).all()
    assert [(c.other_repo_id, c.relation) for c in comparisons] == [
        ("alice/model", "merge_parent"),
        ("base/model", "finetune_parent"),
    ]
    assert comparisons[0].barrier == pytest.approx(0.1)
    assert comparisons[0].barrier_curve["losses"] == [1.0, 1.1, 1.0]
    rows = store_session.scalars(select(FindingRow).order_by(FindingRow.id)).all()
    assert [(f.rule_id, f.severity, f.subject_repo, f.suppressed) for f in rows] == [
        ("AUD101", "high", "eve/merged", False),
        ("AUD401", "info", "eve/merged", True),
    ]
    assert queue.already_audited(store_session, revision_id=rev, analysis_version="1")
    assert not queue.already_audited(store_session, revision_id=rev, analysis_version="2")

    assert [f.rule_id for f in queries.list_findings(store_session, include_suppressed=False)] == [
        "AUD101"
    ]
    assert [a.id for a in queries.audits_by_related_owner(store_session,
                                                          owner="alice")] == [audit_id]
    assert queries.audits_by_related_owner(store_session, owner="mallory") == []
    assert queries.queue_depth(store_session).done == 1


def test_complete_refuses_a_lost_lease(store_session: Session) -> None:
    rev = _revision(store_session)
    audit_id = queue.queue_audit(store_session, revision_id=rev, analysis_version="1",
                                 config_hash="c")
    assert audit_id is not None
    queue.claim_next_audit(store_session, worker_id="w1", lease_seconds=60)
    with pytest.raises(StoreError, match="not held by worker"):
        queue.complete_audit(store_session, audit_id=audit_id, report=make_report(), worker_id="w2")


def test_lease_expiry_requeues(store_session: Session) -> None:
    rev = _revision(store_session)
    audit_id = queue.queue_audit(store_session, revision_id=rev, analysis_version="1",
                                 config_hash="c")
    claimed = queue.claim_next_audit(store_session, worker_id="dead", lease_seconds=30)
    assert claimed is not None and claimed.lease_expires_at is not None
    assert queue.claim_next_audit(store_session, worker_id="w2", lease_seconds=30) is None
    assert queue.requeue_expired(store_session) == 0  # lease still valid
    later = datetime.now(UTC) + timedelta(seconds=31)
    assert queue.requeue_expired(store_session, now=later) == 1
    again = queue.claim_next_audit(store_session, worker_id="w2", lease_seconds=30)
    assert again is not None and again.id == audit_id
    assert again.worker_id == "w2" and again.attempts == 2
    assert not queue.renew_lease(store_session, audit_id=audit_id, worker_id="dead",
                                 lease_seconds=30)
    assert queue.renew_lease(store_session, audit_id=audit_id, worker_id="w2", lease_seconds=30)
    # a revision that keeps killing its worker ends up failed, not in an endless loop
    much_later = datetime.now(UTC) + timedelta(hours=1)
    assert queue.requeue_expired(store_session, now=much_later, max_attempts=2) == 0
    audit = queries.get_audit(store_session, audit_id=audit_id)
    assert audit is not None and audit.status == "failed" and "lease expired" in audit.error


def test_fail_retry_backoff_then_failed(store_session: Session) -> None:
    rev = _revision(store_session)
    audit_id = queue.queue_audit(store_session, revision_id=rev, analysis_version="1",
                                 config_hash="c")
    assert audit_id is not None
    queue.claim_next_audit(store_session, worker_id="w", lease_seconds=30)
    status = queue.fail_audit(
        store_session, audit_id=audit_id, error="503", retryable=True, max_attempts=2,
        backoff_seconds=100,
    )
    assert status == "queued"
    audit = queries.get_audit(store_session, audit_id=audit_id)
    assert audit is not None and audit.next_attempt_at is not None
    assert audit.next_attempt_at > datetime.now(UTC) + timedelta(seconds=90)
    # not due yet: nothing to claim
    assert queue.claim_next_audit(store_session, worker_id="w", lease_seconds=30) is None
    assert [a.id for a in queries.recent_failures(store_session)] == [audit_id]

    audit.next_attempt_at = datetime.now(UTC) - timedelta(seconds=1)
    store_session.commit()
    assert queue.claim_next_audit(store_session, worker_id="w", lease_seconds=30) is not None
    status = queue.fail_audit(
        store_session, audit_id=audit_id, error="503 again", retryable=True, max_attempts=2
    )
    assert status == "failed"  # attempts exhausted
    # a failed audit is re-queued in place, not duplicated
    assert queue.queue_audit(store_session, revision_id=rev, analysis_version="1",
                             config_hash="c") == audit_id
    audit = queries.get_audit(store_session, audit_id=audit_id)
    assert audit is not None and audit.status == "queued" and audit.attempts == 0


def test_non_retryable_failure_and_skip(store_session: Session) -> None:
    rev = _revision(store_session)
    a1 = queue.queue_audit(store_session, revision_id=rev, analysis_version="1", config_hash="c1")
    a2 = queue.queue_audit(store_session, revision_id=rev, analysis_version="1", config_hash="c2")
    assert a1 is not None and a2 is not None
    queue.claim_next_audit(store_session, worker_id="w", lease_seconds=30)
    assert queue.fail_audit(store_session, audit_id=a1, error="bad header",
                            retryable=False) == "failed"
    queue.skip_audit(store_session, audit_id=a2, reason="gated")
    depth = queries.queue_depth(store_session)
    assert (depth.failed, depth.skipped, depth.queued) == (1, 1, 0)


def test_new_analysis_version_reaudits_and_keeps_history(store_session: Session) -> None:
    rev = _revision(store_session)
    old = queue.queue_audit(store_session, revision_id=rev, analysis_version="1", config_hash="c")
    assert old is not None
    queue.claim_next_audit(store_session, worker_id="w", lease_seconds=30)
    queue.complete_audit(store_session, audit_id=old, report=make_report())
    assert not queue.already_audited(store_session, revision_id=rev, analysis_version="2")
    new = queue.queue_audit(store_session, revision_id=rev, analysis_version="2", config_hash="c")
    assert new is not None and new != old
    queue.claim_next_audit(store_session, worker_id="w", lease_seconds=30)
    queue.complete_audit(store_session, audit_id=new, report=make_report(analysis_version="2"))

    history = queries.audit_history(store_session, revision_id=rev)
    assert [(a.analysis_version, a.status) for a in history] == [("1", "done"), ("2", "done")]
    latest = queries.latest_done_audit(store_session, revision_id=rev)
    assert latest is not None and latest.id == new
    assert [a.id for a in queries.latest_done_audits(store_session)] == [new]
    # both audits keep their findings; latest_only shows the newest audit's
    assert len(queries.list_findings(store_session)) == 4
    assert {f.audit_id for f in queries.list_findings(store_session, latest_only=True)} == {new}


def test_fingerprints(store_session: Session) -> None:
    rev = _revision(store_session)
    blob = bytes(range(256)) * 10
    fid = catalog.save_fingerprint(
        store_session, revision_id=rev, analysis_version="1", data=blob, error_bound=1e-3
    )
    assert catalog.load_fingerprint_bytes(store_session, revision_id=rev,
                                          analysis_version="1") == blob
    assert catalog.load_fingerprint_bytes(store_session, revision_id=rev,
                                          analysis_version="2") is None
    assert catalog.save_fingerprint(store_session, revision_id=rev, analysis_version="1",
                                    data=b"x") == fid
    row = catalog.load_fingerprint(store_session, revision_id=rev, analysis_version="1")
    assert row is not None and row.data == b"x"
    with pytest.raises(StoreError):
        catalog.save_fingerprint(store_session, revision_id=rev, analysis_version="3")


def test_crawl_cursors(store_session: Session) -> None:
    assert catalog.get_cursor(store_session, base_repo_id="base/model") is None
    t = datetime(2025, 3, 1, 12, tzinfo=UTC)
    catalog.set_cursor(store_session, base_repo_id="base/model", last_created_at=t, last_sha="abc")
    catalog.set_cursor(store_session, base_repo_id="base/model", error="timeout")
    cursor = catalog.get_cursor(store_session, base_repo_id="base/model")
    assert cursor is not None
    assert (cursor.last_created_at, cursor.last_sha, cursor.last_error) == (t, "abc", "timeout")
    assert cursor.last_success_at is not None
    assert [c.base_repo_id for c in catalog.last_crawls(store_session)] == ["base/model"]


def test_authorizations(store_session: Session) -> None:
    a = policy.add_authorization(store_session, owner="alice", subject="eve/*", note="friends")
    assert policy.add_authorization(store_session, owner="alice", subject="eve/*").id == a.id
    policy.add_authorization(
        store_session, owner="bob", subject="eve/merged", related_repo="bob/model"
    )
    with pytest.raises(StoreError):
        policy.add_authorization(
            store_session, owner="bob", subject="x/y", related_repo="alice/model"
        )
    assert len(policy.list_authorizations(store_session)) == 2
    match = policy.match_authorizations
    assert [
        m.id for m in match(store_session, subject_repo="eve/merged", related_repo="alice/any")
    ] == [a.id]
    assert match(store_session, subject_repo="mallory/x", related_repo="alice/any") == []
    assert len(match(store_session, subject_repo="eve/merged", related_repo="bob/model")) == 1
    assert match(store_session, subject_repo="eve/merged", related_repo="bob/other") == []
    assert match(store_session, subject_repo="eve/merged", related_repo=None) == []
    assert policy.remove_authorization(store_session, authorization_id=a.id)
    assert len(policy.list_authorizations(store_session, owner="alice")) == 0


def test_db_and_authorize_cli(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from auditor.cli import app
    from auditor.settings import get_settings
    from auditor.store.db import make_engine, session_factory

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("AUDITOR_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        result = runner.invoke(app, ["db", "upgrade"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(
            app, ["authorize", "alice", "eve/*", "--related", "alice/math", "--note", "ok"]
        )
        assert result.exit_code == 0, result.output
        listed = runner.invoke(app, ["authorizations"])
        assert listed.exit_code == 0 and "alice/math" in listed.output
        engine = make_engine(url)
        with session_factory(engine)() as session:
            (auth,) = policy.list_authorizations(session)
            assert (auth.owner, auth.subject, auth.related_repo, auth.note) == (
                "alice",
                "eve/*",
                "alice/math",
                "ok",
            )
        engine.dispose()
        assert runner.invoke(app, ["unauthorize", str(auth.id)]).exit_code == 0
    finally:
        get_settings.cache_clear()
