"""Celery backend end to end: real RabbitMQ, real ``celery worker`` processes (prefork, not
eager), the real orchestrator, PostgreSQL, and ``auditor daemon --backend celery``.

Skips say why: no PostgreSQL, no RabbitMQ (scripts/test.sh starts it when it is
installed), or no rabbitmq-server binary for the private node of the timeout test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from auditor.store import policy, queries
from tests.celery_support import (
    REPO_ROOT,
    SHARED_BROKER,
    delete_queues,
    port_open,
    private_rabbitmq,
    queue_prefix,
    rabbitmq_server_binary,
    read_calls,
    start_scheduler,
    start_worker,
    stop,
    wait_for,
    worker_env,
)
from tests.test_daemon_support import BASE, DERIVATIVES, audit_rows, dump, make_model, make_zoo

pytestmark = pytest.mark.postgres

CLONE = "eve/ft-a-copy"  # alice/ft-a's weights re-uploaded later: a finding to store once


@pytest.fixture
def shared_broker() -> str:
    if not port_open("127.0.0.1", 5672):
        pytest.skip("RabbitMQ at 127.0.0.1:5672 is not reachable: the Celery tests need a "
                    "real broker (scripts/test.sh starts rabbitmq-server when installed)")
    return SHARED_BROKER


def _factory(url: str) -> Any:
    from auditor.store.db import make_engine, session_factory, upgrade_database

    upgrade_database(url)
    return session_factory(make_engine(url))


def _pids_of_group(pgid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    out.add(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return out


def test_two_workers_sigkill_mid_audit_every_audit_done_once(
        tmp_path: Path, hub_root: Path, hub_server: Any, pg_url: str,
        shared_broker: str) -> None:
    derivatives = [*DERIVATIVES, CLONE]
    make_zoo(hub_root)
    make_model(hub_root, CLONE, seed=1, hours=len(DERIVATIVES) + 1)
    server = hub_server(hub_root)
    factory = _factory(pg_url)
    with factory() as session:
        policy.watch_add(session, repo_id=BASE)
    prefix = queue_prefix()
    calls = tmp_path / "calls.txt"
    env = worker_env(database_url=pg_url, hub_endpoint=server.url, broker_url=shared_broker,
                     prefix=prefix, data_dir=tmp_path / "data", calls=calls,
                     extra={"CELERY_TEST_SLOW": "*", "CELERY_TEST_DELAY": "1.5",
                            "AUDITOR_LEASE_SECONDS": "4"})
    logs = [tmp_path / "w1.log", tmp_path / "w2.log", tmp_path / "scheduler.log"]
    workers = [start_worker(env, name=f"w{i}", queues=f"{prefix}.cpu", log_path=logs[i - 1],
                            cache_dir=tmp_path / f"cache-{i}") for i in (1, 2)]
    scheduler = None
    try:
        from auditor.daemon.celery_store import workers_seen

        def seen() -> int:
            with factory() as session:
                return len(workers_seen(session))

        wait_for(lambda: seen() == 2, timeout=90, what="two worker heartbeats", logs=logs)
        scheduler = start_scheduler(env, log_path=logs[2])

        def mid_audit() -> bool:
            # Both workers finished an audit (so each stored fingerprints the other may
            # compare with), and one is running.
            events = read_calls(calls)
            ended = {r for e, _, r in events if e == "end"}
            enders = {p for e, p, _ in events if e == "end"}
            return len(enders) == 2 and any(e == "start" and r not in ended
                                            for e, _, r in events)

        wait_for(mid_audit, timeout=120, interval=0.05, what="an audit in progress", logs=logs)
        events = read_calls(calls)
        ended = {r for e, _, r in events if e == "end"}
        victim_pid, victim_repo = next((p, r) for e, p, r in events
                                       if e == "start" and r not in ended)
        victim = next(w for w in workers if victim_pid in _pids_of_group(w.pid))
        survivor = next(w for w in workers if w is not victim)
        survivor_pids = _pids_of_group(survivor.pid)
        os.killpg(victim.pid, signal.SIGKILL)  # the worker machine is gone: main and pool
        victim.wait(timeout=10)

        def all_done() -> bool:
            with factory() as session:
                return queries.queue_depth(session).done == len(derivatives)

        wait_for(all_done, timeout=180, what="every audit done", logs=logs)
        status = subprocess.run([sys.executable, "-m", "auditor.cli", "status", "--json"],
                                env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0, status.stderr
        assert stop(scheduler) == 0
        assert stop(survivor) == 0
    finally:
        for proc in [*workers, *([scheduler] if scheduler else [])]:
            stop(proc, sig=signal.SIGKILL)
        delete_queues(shared_broker, prefix)

    from auditor.store.models import Audit, FindingRow
    from auditor.store.models import Fingerprint as FingerprintRow

    with factory() as session:
        rows = audit_rows(session)
        # Every revision audited, once, done.
        assert sorted(r["repo_id"] for r in rows) == sorted(derivatives), dump(rows)
        assert {r["status"] for r in rows} == {"done"}, dump(rows)
        audits = {a.id: a for a in session.scalars(select(Audit))}
        # Findings stored once: exactly the report's findings, per audit.
        stored = dict(session.execute(select(FindingRow.audit_id, func.count())
                                      .group_by(FindingRow.audit_id)).all())
        for audit in audits.values():
            assert stored.get(audit.id, 0) == len(audit.report["findings"]), audit.id
        assert sum(stored.values()) > 0, "the zoo's clone should produce findings"
        # Fingerprints live in the store (bytes), never as a path on one worker's disk.
        prints = session.scalars(select(FingerprintRow)).all()
        assert len(prints) == len(derivatives)
        assert all(p.data and p.path is None for p in prints)
        holder = {r["repo_id"]: audits[r["id"]].worker_id for r in rows}
        reports = {r["repo_id"]: audits[r["id"]].report for r in rows}
        victim_row = next(r for r in rows if r["repo_id"] == victim_repo)
    # Each audit ran to its end exactly once; only the killed one started twice, and it
    # was completed by the surviving worker.
    events = read_calls(calls)
    ends = Counter(r for e, _, r in events if e == "end")
    starts = Counter(r for e, _, r in events if e == "start")
    assert ends == Counter(derivatives), ends
    assert starts[victim_repo] == 2, starts
    assert all(starts[r] == 1 for r in derivatives if r != victim_repo), starts
    finisher = next(p for e, p, r in events if e == "end" and r == victim_repo)
    assert finisher in survivor_pids
    assert holder[victim_repo].split(":")[1] == str(finisher)
    # Two recoveries are both right and race each other: the expired lease (the attempt
    # counts: 2) or the scheduler seeing the holder's pid dead on this host (a dead holder is
    # not the audit's fault: release_audit gives the attempt back, 1). Never more, never 0.
    assert victim_row["attempts"] in (1, 2), victim_row
    # Both workers audited, and audits compared against homologues the other one stored.
    assert len(set(holder.values())) == 2, holder
    crossed = [(r, e["repo_id"]) for r, rep in reports.items() for e in rep["lineage"]
               if e["repo_id"] in holder and holder[e["repo_id"]] != holder[r]]
    assert crossed, reports
    data = json.loads(status.stdout)
    assert len(data["workers"]) == 2 and sum(w["audits_done"] for w in data["workers"]) \
        == len(derivatives), data["workers"]


def test_audit_longer_than_consumer_timeout_runs_once(
        tmp_path: Path, hub_root: Path, hub_server: Any, pg_url: str) -> None:
    if rabbitmq_server_binary() is None:
        pytest.skip("rabbitmq-server is not installed: this test starts a private RabbitMQ "
                    "node with a 1.5 s consumer_timeout (server-wide in RabbitMQ 3.10)")
    derivative = DERIVATIVES[0]
    make_zoo(hub_root, derivatives=(derivative,))
    server = hub_server(hub_root)
    factory = _factory(pg_url)
    with factory() as session:
        policy.watch_add(session, repo_id=BASE)
    calls = tmp_path / "calls.txt"
    logs = [tmp_path / "worker.log", tmp_path / "scheduler.log"]
    with private_rabbitmq(tmp_path / "rabbit", consumer_timeout_ms=1500) as broker:
        prefix = queue_prefix()
        # The audit takes 8 s: over five times the broker's timeout, under the lease.
        env = worker_env(database_url=pg_url, hub_endpoint=server.url, broker_url=broker,
                         prefix=prefix, data_dir=tmp_path / "data", calls=calls,
                         extra={"CELERY_TEST_SLOW": derivative, "CELERY_TEST_DELAY": "8",
                                "AUDITOR_LEASE_SECONDS": "30"})
        # Two pool processes: the redelivered message finds a free one at once.
        worker = start_worker(env, name="w", queues=f"{prefix}.cpu", log_path=logs[0],
                              concurrency=2)
        try:
            from auditor.daemon.celery_store import workers_seen

            def seen() -> int:
                with factory() as session:
                    return len(workers_seen(session))

            wait_for(lambda: seen() == 2, timeout=90, what="worker heartbeats", logs=logs)
            scheduler = subprocess.run(
                [sys.executable, "-m", "auditor.cli", "daemon", "--backend", "celery",
                 "--once", "--log-level", "info"], env=env, cwd=REPO_ROOT, timeout=180,
                stdout=logs[1].open("w"), stderr=subprocess.STDOUT)
            assert scheduler.returncode == 0, logs[1].read_text()[-3000:]
        finally:
            stop(worker)
    worker_log = logs[0].read_text(errors="replace")
    # The broker did time the delivery out (the test proves something) ...
    assert "PRECONDITION_FAILED" in worker_log or "timed out" in worker_log, worker_log[-4000:]
    # ... its redelivery found the audit leased and did not start it again.
    assert "message ignored: audit not claimable" in worker_log, worker_log[-4000:]
    starts = Counter(r for e, _, r in read_calls(calls) if e == "start")
    assert starts == Counter([derivative]), starts
    with factory() as session:
        rows = audit_rows(session)
    assert [(r["repo_id"], r["status"], r["attempts"]) for r in rows] == \
        [(derivative, "done", 1)], dump(rows)


WORKER_CLI = """
import sys
sys.path.insert(0, {root!r})
import tests.celery_test_app  # noqa: F401  (wraps the orchestrator: slow, logged)
from auditor.cli import main
sys.argv = ["auditor", "worker", *{args!r}]
main()
"""


def test_gpu_worker_sigterm_gives_the_audit_back(
        tmp_path: Path, hub_root: Path, hub_server: Any, pg_url: str,
        shared_broker: str) -> None:
    from auditor.daemon.celery_scheduler import Dispatcher
    from auditor.daemon.celery_store import workers_seen
    from auditor.daemon.crawler import crawl_base
    from auditor.hub.client import HubClient
    from auditor.settings import Settings, analysis_config_hash
    from tests.fixtures_hub import make_repo
    from tests.test_daemon_support import LLAMA_CONFIG, base_tensors, finetuned, iso_hours

    derivative = "alice/chat"
    make_zoo(hub_root, derivatives=())
    # config.json + tokenizer.json + full weights: behavioural checks apply -> gpu queue.
    make_repo(hub_root, derivative, finetuned(base_tensors(), 7),
              {"base_model": BASE, "base_model_relation": "finetune"},
              config=LLAMA_CONFIG, files={"tokenizer.json": "{}"},
              meta={"createdAt": iso_hours(3)})
    server = hub_server(hub_root)
    factory = _factory(pg_url)
    prefix = queue_prefix()
    calls = tmp_path / "calls.txt"
    env = worker_env(database_url=pg_url, hub_endpoint=server.url, broker_url=shared_broker,
                     prefix=prefix, data_dir=tmp_path / "data", calls=calls,
                     extra={"CELERY_TEST_SLOW": "*", "CELERY_TEST_DELAY": "60",
                            "AUDITOR_GPU_QUEUE": "1"})
    env.pop("AUDITOR_DEVICE", None)
    settings = Settings(database_url=pg_url, hub_endpoint=server.url, broker_url=shared_broker,
                        queue_prefix=prefix, gpu_queue=True, data_dir=tmp_path / "data")
    client = HubClient.from_settings(settings)
    with factory() as session:
        policy.watch_add(session, repo_id=BASE)
        crawl_base(session, client, BASE, config_hash=analysis_config_hash(settings))
    with factory() as session:
        # A cpu worker's first pass is done and deferred the behavioural checks: the
        # second pass is what goes to the gpu queue.
        from auditor.store.models import Audit
        session.execute(update(Audit).values(
            status="done", behaviour_pending=True,
            report={"subject": {"repo_id": derivative}, "coverage": {"behaviour_deferred": 1}}))
        session.commit()
    script = tmp_path / "worker.py"
    script.write_text(WORKER_CLI.format(root=str(REPO_ROOT), args=[
        "--queues", "gpu", "--grace-seconds", "1", "--lease-seconds", "120"]))
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO_ROOT,
                              stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    dispatcher = Dispatcher(factory, settings, client=client)
    try:
        def seen() -> list[Any]:
            with factory() as session:
                return workers_seen(session)

        wait_for(lambda: len(seen()) == 1, timeout=90, what="worker heartbeat", logs=[log])
        (w,) = seen()
        assert (w.device, w.queues) == ("cuda", [f"{prefix}.gpu"])
        assert dispatcher.dispatch_once() == 1
        assert dispatcher.dispatch_once() == 0  # already published, nothing changed
        wait_for(lambda: read_calls(calls), timeout=60, what="the audit to start", logs=[log])
        with factory() as session:
            assert queries.queue_depth(session).running == 1
        os.kill(worker.pid, signal.SIGTERM)  # what `docker stop` or systemd sends
        assert worker.wait(timeout=60) == 0, log.read_text()[-3000:]
        depths = dispatcher.queue_depths()
        # Its message is back in the broker: nothing to publish; the metrics say so.
        assert dispatcher.dispatch_once() == 0
        dispatcher.update_worker_metrics()
        from prometheus_client import REGISTRY

        assert REGISTRY.get_sample_value("auditor_broker_queue_messages",
                                         {"queue": f"{prefix}.gpu"}) == 1
        assert REGISTRY.get_sample_value("auditor_workers_seen") == 1
    finally:
        stop(worker, sig=signal.SIGKILL)
        delete_queues(shared_broker, prefix)
    # Given back: queued again, the attempt not counted, the message back in the queue.
    with factory() as session:
        rows = audit_rows(session)
        (after,) = seen()
    assert [(r["repo_id"], r["status"], r["attempts"]) for r in rows] == \
        [(derivative, "queued", 0)], dump(rows)
    assert depths[f"{prefix}.gpu"][0] == 1 and depths[f"{prefix}.cpu"][0] == 0
    assert [e for e, _, _ in read_calls(calls)] == ["start"]
    assert after.stopped and after.current_audit_id is None
    assert "audit given back on shutdown" in log.read_text()
