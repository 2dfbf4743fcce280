"""The Celery backend's store side, without a broker: claiming one audit by id (the gate
that makes a redelivered message a no-op), routing, worker heartbeats."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from auditor.daemon.celery_store import DueAudit, claim_audit, due_audits, heartbeat, workers_seen
from auditor.settings import Settings
from auditor.store import catalog, queue
from auditor.store.models import Audit, utcnow
from auditor.store.recording import save_result
from tests.test_daemon_support import FakeAudit


def _queue(session: Session, repo: str = "o/m", sha: str = "a" * 40) -> int:
    rev = catalog.upsert_revision(session, repo_id=repo, sha=sha)
    audit_id = queue.queue_audit(session, revision_id=rev.id, analysis_version="1",
                                 config_hash="c")
    assert audit_id is not None
    return audit_id


def test_claim_by_id_only_once_while_the_lease_lives(store_session: Session) -> None:
    audit_id = _queue(store_session)
    first = claim_audit(store_session, audit_id, worker_id="h:1:1", lease_seconds=60,
                        max_attempts=5)
    assert first.claimed and first.attempts == 1
    # The redelivered message: someone holds a live lease -> no-op, with the reason.
    again = claim_audit(store_session, audit_id, worker_id="h:2:1", lease_seconds=60,
                        max_attempts=5)
    assert not again.claimed and (again.status, again.holder) == ("running", "h:1:1")
    # The holder died: once its lease expired, another worker takes the audit over.
    store_session.execute(update(Audit).where(Audit.id == audit_id).values(
        lease_expires_at=utcnow() - timedelta(seconds=1)))
    store_session.commit()
    taken = claim_audit(store_session, audit_id, worker_id="h:2:1", lease_seconds=60,
                        max_attempts=5)
    assert taken.claimed and taken.holder == "h:2:1" and taken.attempts == 2
    # ... and the dead holder's late result is refused.
    assert not claim_audit(store_session, audit_id, worker_id="h:1:1", lease_seconds=60,
                           max_attempts=5).claimed


def test_claim_refuses_done_missing_not_due_and_spent(store_session: Session) -> None:
    audit_id = _queue(store_session)
    assert claim_audit(store_session, audit_id, worker_id="w", lease_seconds=60,
                       max_attempts=5).claimed
    outcome = FakeAudit()("o/m", client=_NoHub())
    revision_id = store_session.get(Audit, audit_id).revision_id
    save_result(store_session, audit_id=audit_id, revision_id=revision_id,
                report=outcome.report, fingerprint=None, worker_id="w")
    done = claim_audit(store_session, audit_id, worker_id="x", lease_seconds=60,
                       max_attempts=5)
    assert (done.claimed, done.status) == (False, "done")
    assert claim_audit(store_session, 999, worker_id="x", lease_seconds=60,
                       max_attempts=5).status == "missing"
    later = _queue(store_session, "o/n", "b" * 40)
    store_session.execute(update(Audit).where(Audit.id == later).values(
        next_attempt_at=utcnow() + timedelta(hours=1)))
    store_session.commit()
    assert not claim_audit(store_session, later, worker_id="x", lease_seconds=60,
                           max_attempts=5).claimed
    assert [a.audit_id for a in due_audits(store_session)] == []
    # An expired audit that already used its attempts is left to requeue_expired (failed).
    store_session.execute(update(Audit).where(Audit.id == later).values(
        status="running", attempts=5, worker_id="dead",
        lease_expires_at=utcnow() - timedelta(seconds=1)))
    store_session.commit()
    assert not claim_audit(store_session, later, worker_id="x", lease_seconds=60,
                           max_attempts=5).claimed


class _NoHub:
    def resolve(self, subject: str, revision: str | None = None) -> object:
        from types import SimpleNamespace

        return SimpleNamespace(revision="a" * 40, files={})


def test_route_sends_behavioural_passes_to_gpu_only_when_enabled() -> None:
    from dataclasses import replace

    from auditor.daemon.celery_scheduler import route

    full = DueAudit(audit_id=1, state=(), repo_id="o/m", sha="s", files=frozenset(
        {"model.safetensors", "config.json", "tokenizer.json"}))
    adapter = DueAudit(audit_id=2, state=(), repo_id="o/a", sha="s", files=frozenset(
        {"adapter_model.safetensors", "adapter_config.json", "config.json",
         "tokenizer.json"}))
    unknown = DueAudit(audit_id=3, state=(), repo_id="o/u", sha="s", files=None)
    first = (full, adapter, unknown)
    second = tuple(replace(a, behaviour_pending=True) for a in first)
    on = Settings(gpu_queue=True, queue_prefix="p")
    off = Settings(gpu_queue=False, queue_prefix="p")
    # First passes (weights, lineage) run on cpu workers; the behavioural pass of a model
    # the checks can run goes to gpu.
    assert [route(on, a) for a in first] == ["p.cpu", "p.cpu", "p.cpu"]
    assert [route(on, a) for a in second] == ["p.gpu", "p.cpu", "p.cpu"]
    assert {route(off, a) for a in first + second} == {"p.cpu"}


def test_heartbeats_and_workers_seen(store_session: Session) -> None:
    heartbeat(store_session, worker_id="h:1:1", pid=1, queues=["p.cpu"], device="cpu",
              current_audit_id=None)
    heartbeat(store_session, worker_id="h:1:1", pid=1, queues=["p.cpu"], device="cpu",
              current_audit_id=7, done=2, failed=1)
    heartbeat(store_session, worker_id="h:2:1", pid=2, queues=["p.gpu"], device="cuda",
              current_audit_id=None, stopped=True)
    seen = {w.worker_id: w for w in workers_seen(store_session, minutes=5)}
    assert set(seen) == {"h:1:1", "h:2:1"}
    assert (seen["h:1:1"].audits_done, seen["h:1:1"].audits_failed,
            seen["h:1:1"].current_audit_id) == (2, 1, 7)
    assert seen["h:2:1"].stopped and seen["h:2:1"].device == "cuda"
    # A worker not seen for longer than the window is left out.
    from auditor.store.models import WorkerHeartbeat

    store_session.execute(update(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == "h:2:1")
                          .values(last_seen_at=utcnow() - timedelta(minutes=10)))
    store_session.commit()
    assert [w.worker_id for w in workers_seen(store_session, minutes=5)] == ["h:1:1"]
