"""Audit workers, the worker pool, the scheduler and the CLI commands (fake orchestrator).

The end-to-end tests with the real orchestrator are in test_daemon_e2e.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from auditor.daemon.crawler import crawl_base
from auditor.daemon.scheduler import Daemon, crawl_job_id, wait_until
from auditor.daemon.worker import RetryPolicy, WorkerPool, run_one
from auditor.errors import GatedRepo, MissingBase, RateLimited, TransientHubError
from auditor.hub.client import HubClient
from auditor.settings import Settings
from auditor.store import catalog, policy, queries, queue
from auditor.store.models import utcnow
from tests.test_daemon_support import BASE, DERIVATIVES, FakeAudit, audit_rows, dump, make_zoo

FAST = RetryPolicy(max_attempts=5, backoff_seconds=0.05)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[str, sessionmaker[Session]]]:
    from auditor.store.db import make_engine, session_factory, upgrade_database

    url = f"sqlite:///{tmp_path / 'auditor.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    yield url, session_factory(engine)
    engine.dispose()


@pytest.fixture
def hub(hub_root: Path, hub_server: Any, hf_cache: Path) -> HubClient:
    make_zoo(hub_root)
    server = hub_server(hub_root)
    return HubClient(endpoint=server.url, token=None, cache_dir=hf_cache,
                     disk_budget_bytes=None, backoff_seconds=0.01, max_wait_seconds=0.1)


def settings_for(tmp_path: Path, url: str, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=url, **kw)


def crawl(factory: sessionmaker[Session], client: HubClient) -> Any:
    with factory() as session:
        policy.watch_add(session, repo_id=BASE)
        return crawl_base(session, client, BASE, config_hash="h")


def test_run_one_records_report_fingerprint_and_passes_homologues(
        tmp_path: Path, db: Any, hub: HubClient) -> None:
    url, factory = db
    crawl(factory, hub)
    fake = FakeAudit(backdoor_for={DERIVATIVES[-1]})  # the first one audited (oldest queued?)
    settings = settings_for(tmp_path, url)
    done = 0
    while run_one(factory, hub, settings, worker_id="h:1:1", audit_fn=fake, retry=FAST):
        done += 1
    assert done == len(DERIVATIVES)
    assert not run_one(factory, hub, settings, worker_id="h:1:1", audit_fn=fake)
    with factory() as session:
        rows = audit_rows(session)
        assert [r["status"] for r in rows] == ["done"] * len(DERIVATIVES), dump(rows)
        depth = queries.queue_depth(session)
        assert depth.done == len(DERIVATIVES) and depth.queued == 0
        for r in rows:
            rev = catalog.get_revision(session, repo_id=r["repo_id"], sha=r["sha"])
            assert rev is not None
            assert catalog.load_fingerprint(session, revision_id=rev.id, analysis_version="1")
    # Each audit compares with every derivative fingerprinted before it, with the
    # backdoor verdict of the flagged one.
    order = [c["subject"] for c in fake.calls]
    for i, call in enumerate(fake.calls):
        assert call["base"] == BASE
        assert set(call["homologues"]) == set(order[:i])
        for repo_id, ref in call["homologues"].items():
            assert ref.fingerprint.keys() == ["w"]
            assert ref.revision is not None
            assert (ref.backdoor is not None) == (repo_id == DERIVATIVES[-1])


def test_run_one_maps_errors_to_skip_retry_and_failure(
        tmp_path: Path, db: Any, hub: HubClient) -> None:
    url, factory = db
    crawl(factory, hub)
    a, b, c, d = DERIVATIVES
    fake = FakeAudit(fail_with={
        a: GatedRepo("gated repo, access needs accepted terms"),
        b: RateLimited("rate limited (429)", retry_after=30.0),
        c: TransientHubError("server error 503"),
        d: MissingBase("no base"),
    })
    settings = settings_for(tmp_path, url)
    policy = RetryPolicy(max_attempts=2, backoff_seconds=10.0)
    for _ in DERIVATIVES:
        assert run_one(factory, hub, settings, worker_id="h:1:1", audit_fn=fake, retry=policy)
    with factory() as session:
        rows = {r["repo_id"]: r for r in audit_rows(session)}
        assert rows[a]["status"] == "skipped" and "gated" in rows[a]["error"]
        repo = catalog.get_repo(session, repo_id=a)
        assert repo is not None and repo.gated and "gated" in (repo.skip_reason or "")
        assert rows[b]["status"] == "queued" and rows[c]["status"] == "queued"
        assert rows[d]["status"] == "failed" and "no base" in rows[d]["error"]
        audit_b = queries.get_audit(session, audit_id=rows[b]["id"])
        audit_c = queries.get_audit(session, audit_id=rows[c]["id"])
        assert audit_b is not None and audit_c is not None
        # Retry-After honoured (30 s > the 10 s backoff), plain backoff otherwise.
        assert audit_b.next_attempt_at - utcnow() > timedelta(seconds=25)
        assert timedelta(seconds=5) < audit_c.next_attempt_at - utcnow() < timedelta(seconds=11)
    # Not due yet: nothing to claim.
    assert not run_one(factory, hub, settings, worker_id="h:1:1", audit_fn=fake, retry=policy)


def test_lease_renewed_during_long_audit(tmp_path: Path, db: Any, hub: HubClient) -> None:
    url, factory = db
    crawl(factory, hub)
    fake = FakeAudit(delay=1.2)
    settings = settings_for(tmp_path, url)
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(run_one(
        factory, hub, settings, worker_id="h:1:1", audit_fn=fake, lease_seconds=0.4)))
    thread.start()
    requeued = 0
    while thread.is_alive():
        with factory() as session:
            requeued += queue.requeue_expired(session)
        time.sleep(0.1)
    thread.join()
    assert result == [True] and requeued == 0
    with factory() as session:
        assert [r["status"] for r in audit_rows(session)].count("done") == 1


def test_pool_stop_grace_finishes_or_requeues(tmp_path: Path, db: Any, hub: HubClient) -> None:
    url, factory = db
    crawl(factory, hub)
    settings = settings_for(tmp_path, url)

    slow = FakeAudit(delay=0.8)
    pool = WorkerPool(factory, hub, settings, workers=2, audit_fn=slow, poll_seconds=0.05)
    pool.start()
    assert wait_until(lambda: len(pool.in_flight) == 2, timeout=10)
    assert pool.stop(grace_seconds=10)  # both finish in time
    with factory() as session:
        statuses = [r["status"] for r in audit_rows(session)]
    assert statuses.count("done") == 2 and statuses.count("queued") == 2

    stuck = FakeAudit(delay=3.0)
    pool = WorkerPool(factory, hub, settings, workers=1, audit_fn=stuck, poll_seconds=0.05)
    pool.start()
    assert wait_until(lambda: len(pool.in_flight) == 1, timeout=10)
    assert not pool.stop(grace_seconds=0.2)
    with factory() as session:
        rows = audit_rows(session)
    assert [r["status"] for r in rows].count("running") == 0, dump(rows)
    # Given back without spending an attempt.
    assert all(r["attempts"] == 0 for r in rows if r["status"] == "queued"), dump(rows)


def test_daemon_schedules_crawls_in_db_jobstore_and_audits(
        tmp_path: Path, db: Any, hub: HubClient) -> None:
    url, factory = db
    with factory() as session:
        policy.watch_add(session, repo_id=BASE)
    settings = settings_for(tmp_path, url)
    fake = FakeAudit()
    daemon = Daemon(settings=settings, database_url=url, client=hub, workers=2,
                    interval_seconds=3600, audit_fn=fake, poll_seconds=0.05,
                    queue_interval_seconds=0.2, retry=FAST)
    daemon.start()
    try:
        def all_done() -> bool:
            with factory() as session:
                return queries.queue_depth(session).done == len(DERIVATIVES)

        assert wait_until(all_done, timeout=30)
        with daemon.engine.connect() as conn:
            ids = {r[0] for r in conn.execute(text("SELECT id FROM apscheduler_jobs"))}
        assert crawl_job_id(BASE) in ids and "queue" in ids

        with factory() as session:
            policy.watch_remove(session, repo_id=BASE)
            policy.watch_add(session, repo_id="tinylab/other-base")
        daemon.sync_jobs()
        assert daemon.scheduler is not None
        job_ids = {j.id for j in daemon.scheduler.get_jobs()}
        assert crawl_job_id(BASE) not in job_ids
        assert crawl_job_id("tinylab/other-base") in job_ids
    finally:
        assert daemon.stop(grace_seconds=5)
        daemon.close()
    assert sorted(c["subject"] for c in fake.calls) == sorted(DERIVATIVES)


def test_cli_watch_and_status(tmp_path: Path) -> None:
    from auditor.cli import app

    env = {"AUDITOR_DATA_DIR": str(tmp_path / "data"),
           "AUDITOR_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    runner = CliRunner()
    assert runner.invoke(app, ["watch", "add", BASE, "--note", "ours", "--no-check"],
                         env=env).exit_code == 0
    assert runner.invoke(app, ["watch", "add", "org/second", "--no-check"], env=env).exit_code == 0
    listed = runner.invoke(app, ["watch", "list"], env=env)
    assert listed.exit_code == 0
    assert listed.output.splitlines() == ["org/second", f"{BASE}  # ours"]
    assert runner.invoke(app, ["watch", "remove", "org/second"], env=env).exit_code == 0
    assert runner.invoke(app, ["watch", "remove", "org/second"], env=env).exit_code == 1
    status = runner.invoke(app, ["status", "--json"], env=env)
    assert status.exit_code == 0, status.output
    data = json.loads(status.output)
    assert data["crawls"] == [{"base": BASE, "watched": True, "last_success_at": None,
                               "last_error": None, "last_error_at": None}]
    assert data["queue"]["queued"] == 0
    human = runner.invoke(app, ["status"], env=env)
    assert human.exit_code == 0 and "never" in human.output and "queue:" in human.output
    assert runner.invoke(app, ["crawl"], env=env).exit_code == 2


def test_metrics_endpoint_exposes_counters_and_gauges() -> None:
    import socket
    import urllib.request

    from auditor.daemon import metrics

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics.serve(port)
    metrics.serve(port)  # idempotent
    metrics.AUDITS.labels(outcome="done").inc()
    metrics.CRAWL_SUCCESS.labels(base=BASE).set(1234.0)
    metrics.update_queue(queries.QueueDepth(queued=3, running=1))
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'auditor_audits_total{outcome="done"}' in body
    assert 'auditor_queue_depth{status="queued"} 3.0' in body
    assert f'auditor_crawl_last_success_timestamp_seconds{{base="{BASE}"}} 1234.0' in body
