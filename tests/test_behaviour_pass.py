"""Two-pass daemon audits: weights and lineage first, the behavioural checks deferred.

Large models on a CPU worker (``Settings.defer_behaviour_bytes``), or every model when a
gpu queue takes the behavioural checks, get a first pass whose report says what is
pending; the second pass is claimed after every first pass and replaces that report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from auditor.daemon.worker import RetryPolicy, run_counts, run_one
from auditor.hub.client import HubClient
from auditor.orchestrator import audit_revision, behaviour_deferred
from auditor.schema import CheckError
from auditor.settings import Settings
from auditor.store import policy, queries
from auditor.store.models import Audit
from tests.test_daemon_support import BASE, DERIVATIVES, FakeAudit, make_zoo

FAST = RetryPolicy(max_attempts=5, backoff_seconds=0.05)


@pytest.fixture
def db(store_url: str) -> Iterator[sessionmaker[Session]]:
    """The store, migrated to head, on SQLite and on PostgreSQL."""
    from auditor.store.db import make_engine, session_factory

    engine = make_engine(store_url)
    yield session_factory(engine)
    engine.dispose()


class DeferringAudit(FakeAudit):
    """The fake orchestrator, deferring the behavioural checks when asked to (as the real
    one does for a large model on the CPU), and recording what each call was asked."""

    def __call__(self, subject: str, **kwargs: Any) -> Any:
        outcome = super().__call__(subject, **kwargs)
        self.calls[-1]["defer"] = kwargs.get("defer_behaviour")
        self.calls[-1]["incremental"] = "previous" in kwargs
        if kwargs.get("defer_behaviour"):
            report = outcome.report.model_copy(update={
                "coverage": {"behaviour_deferred": 1},
                "errors": [CheckError(detector="behaviour", kind="Deferred",
                                      message="deferred")]})
            outcome = SimpleNamespace(**{**vars(outcome), "report": report})
        return outcome


def test_first_passes_all_run_before_any_behavioural_pass(
        tmp_path: Path, db: sessionmaker[Session], hub_root: Path, hub_server: Any,
        hf_cache: Path) -> None:
    from auditor.daemon.crawler import crawl_base

    make_zoo(hub_root)
    server = hub_server(hub_root)
    client = HubClient(endpoint=server.url, token=None, cache_dir=hf_cache,
                       disk_budget_bytes=None, backoff_seconds=0.01, max_wait_seconds=0.1)
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    with db() as session:
        policy.watch_add(session, repo_id=BASE)
        crawl_base(session, client, BASE, config_hash="h")
    fake = DeferringAudit()
    before = run_counts()
    n = len(DERIVATIVES)
    for _ in range(n):
        assert run_one(db, client, settings, worker_id="h:1:1", audit_fn=fake, retry=FAST)
    # Every revision has its first pass: done (its report shown), the behavioural pass due.
    with db() as session:
        rows = session.query(Audit).all()
        assert [(r.status, r.behaviour_pending) for r in rows] == [("done", True)] * n
        assert len(queries.latest_done_audits(session)) == n
        assert queries.pending_count(session) == n
        session.rollback()
    while run_one(db, client, settings, worker_id="h:1:1", audit_fn=fake, retry=FAST):
        pass
    assert [c["defer"] for c in fake.calls] == [True] * n + [False] * n
    assert not any(c["incremental"] for c in fake.calls)  # a second pass is a full audit
    assert sorted(c["subject"] for c in fake.calls[n:]) == sorted(DERIVATIVES)
    with db() as session:
        rows = session.query(Audit).all()
        assert [(r.status, r.behaviour_pending) for r in rows] == [("done", False)] * n
        assert all(not r.report["errors"] for r in rows)
        assert queries.pending_count(session) == 0
        session.rollback()
    runs = {k: v - before[k] for k, v in run_counts().items()}
    assert runs == {"full": n, "incremental": 0, "behaviour": n}


def _ctx(settings: Settings, *, subject_bytes: int, base: bool = True) -> Any:
    def model(size: int) -> Any:
        files = {"model.safetensors": size, "config.json": 10}
        return SimpleNamespace(resolved=SimpleNamespace(files=files))

    return SimpleNamespace(settings=settings, subject=model(subject_bytes),
                           base=model(1000) if base else None)


def test_deferral_follows_size_device_and_gpu_queue(tmp_path: Path) -> None:
    cpu = Settings(data_dir=tmp_path, device="cpu", defer_behaviour_bytes=10_000)
    assert behaviour_deferred(_ctx(cpu, subject_bytes=20_000))
    assert not behaviour_deferred(_ctx(cpu, subject_bytes=5_000))
    assert not behaviour_deferred(_ctx(cpu, subject_bytes=20_000, base=False))
    # a gpu queue takes every behavioural pass off the cpu workers
    queued = cpu.model_copy(update={"gpu_queue": True})
    assert behaviour_deferred(_ctx(queued, subject_bytes=5_000))
    never = cpu.model_copy(update={"defer_behaviour_bytes": 0, "gpu_queue": True})
    assert not behaviour_deferred(_ctx(never, subject_bytes=20_000))
    # a CUDA worker runs the checks itself (or, without CUDA, reports the bad device)
    cuda = cpu.model_copy(update={"device": "cuda"})
    assert not behaviour_deferred(_ctx(cuda, subject_bytes=20_000))


def test_a_deferred_first_pass_is_incomplete_never_clean(small_zoo: Any, hub_server: Any,
                                                          tmp_path: Path) -> None:
    server = hub_server(small_zoo.root)
    settings = Settings(hub_endpoint=server.url, data_dir=tmp_path / "data",
                        cache_dir=tmp_path / "cache", device="cpu", defer_behaviour_bytes=1)
    client = HubClient.from_settings(settings)
    out = audit_revision("carol/tiny-animals", against=["alice/tiny-copy", "bob/tiny-kv"],
                         settings=settings, client=client, defer_behaviour=True)
    rep = out.report
    assert rep.coverage["behaviour_deferred"] == 1
    assert [e.kind for e in rep.errors] == ["Deferred"]
    assert rep.lineage and out.fingerprint is not None  # the weight analysis ran
    assert not {"barrier", "protection", "backdoor"} & set(rep.timings)
    assert out.exit_code != 0
