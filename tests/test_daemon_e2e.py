"""End to end: the real Hub server, the real orchestrator, faults, a killed daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from auditor import __version__
from auditor.daemon.scheduler import Daemon, wait_until
from auditor.daemon.worker import RetryPolicy
from auditor.hub.client import HubClient
from auditor.settings import Settings
from auditor.store import catalog, policy, queries
from auditor_testkit.hub.server import FaultConfig
from tests.test_daemon_support import BASE, DERIVATIVES, audit_rows, dump, make_zoo

REPO_ROOT = Path(__file__).resolve().parent.parent


def _db(tmp_path: Path, url: str | None = None) -> tuple[str, Any]:
    from auditor.store.db import make_engine, session_factory, upgrade_database

    url = url or f"sqlite:///{tmp_path / 'auditor.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    return url, session_factory(engine)


def test_every_derivative_audited_once_under_hub_faults(
        tmp_path: Path, hub_root: Path, hub_server: Any, hf_cache: Path, db_url: str) -> None:
    # Once on SQLite, once on PostgreSQL (db_url from tests/fixtures_store.py).
    make_zoo(hub_root)
    faults = FaultConfig(rate_429=0.2, retry_after=0.05, rate_5xx=0.05, rate_cut=0.1, seed=3,
                         paths=frozenset({"api", "resolve-get", "resolve-head"}))
    server = hub_server(hub_root, faults=faults)
    client = HubClient(endpoint=server.url, token=None, cache_dir=hf_cache,
                       disk_budget_bytes=None, max_retries=3, backoff_seconds=0.01,
                       max_wait_seconds=0.1)
    url, factory = _db(tmp_path, db_url)
    with factory() as session:
        policy.watch_add(session, repo_id=BASE)
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    daemon = Daemon(settings=settings, database_url=url, client=client, workers=2,
                    interval_seconds=3600, poll_seconds=0.05,
                    retry=RetryPolicy(max_attempts=20, backoff_seconds=0.05))
    try:
        # A listing may fail under faults (cursor kept): cron would just run again.
        for _ in range(10):
            results = daemon.run_once()
            if all(r.ok for r in results):
                break
        assert all(r.ok for r in results), [r.error for r in results]
    finally:
        daemon.close()
    with factory() as session:
        rows = audit_rows(session)
        assert sorted(r["repo_id"] for r in rows) == sorted(DERIVATIVES), dump(rows)
        assert {r["status"] for r in rows} == {"done"}, dump(rows)
        for r in rows:
            audit = queries.get_audit(session, audit_id=r["id"])
            assert audit is not None and audit.report["subject"]["revision"] == r["sha"]
            rev = catalog.get_revision(session, repo_id=r["repo_id"], sha=r["sha"])
            assert rev is not None
            assert catalog.load_fingerprint(session, revision_id=rev.id, analysis_version="1")
        # The real orchestrator ran, and compared with the derivatives the store had
        # already fingerprinted (the comparison set comes from the store).
        reports = [queries.get_audit(session, audit_id=r["id"]).report for r in rows]
        assert {rep["tool_version"] for rep in reports} == {__version__}
        compared = {e["repo_id"] for rep in reports for e in rep["lineage"]}
        assert compared & set(DERIVATIVES)
    assert server.hub is not None and server.hub.faults.injected > 0


def test_cli_crawl_once_then_status(tmp_path: Path, hub_root: Path, hub_server: Any) -> None:
    from auditor.cli import app

    make_zoo(hub_root, derivatives=DERIVATIVES[:2])
    server = hub_server(hub_root)
    env = {"AUDITOR_DATA_DIR": str(tmp_path / "data"),
           "AUDITOR_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
           "AUDITOR_HUB_ENDPOINT": server.url, "AUDITOR_WORKERS": "2"}
    runner = CliRunner()
    assert runner.invoke(app, ["watch", "add", BASE], env=env).exit_code == 0
    result = runner.invoke(app, ["crawl", "--once"], env=env)
    assert result.exit_code == 0, result.output
    assert f"{BASE}: listed 2, queued 2, skipped 0 (ok)" in result.output
    # one full audit per revision; a re-queue after a sibling arrives is an update
    runs = re.search(r"audit runs: (\d+) full, (\d+) incremental updates", result.output)
    assert runs is not None and int(runs.group(1)) == 2, result.output
    status = json.loads(runner.invoke(app, ["status", "--json"], env=env).output)
    assert status["queue"]["done"] == 2 and status["queue"]["failed"] == 0
    assert status["crawls"][0]["last_success_at"] is not None
    again = runner.invoke(app, ["crawl", "--once"], env=env)
    assert again.exit_code == 0 and "queued 0" in again.output


WRAPPER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import auditor.orchestrator as orch
    from tests.test_daemon_support import FakeAudit

    fake = FakeAudit(delay=float(os.environ["FAKE_DELAY"]))

    def audit(subject, **kwargs):
        with open(os.environ["CALLS_FILE"], "a") as fh:
            fh.write(subject + "\\n")
        return fake(subject, **kwargs)

    orch.audit_revision = audit
    from auditor.cli import main
    sys.argv = ["auditor", "daemon", "--workers", "1", "--interval", "3600",
                "--lease-seconds", "60", "--retry-backoff", "0.1", "--grace-seconds", "10"]
    main()
""")


def test_daemon_killed_mid_audit_resumes_without_loss_or_repeat(
        tmp_path: Path, hub_root: Path, hub_server: Any) -> None:
    make_zoo(hub_root)
    server = hub_server(hub_root)
    url, factory = _db(tmp_path)
    with factory() as session:
        policy.watch_add(session, repo_id=BASE)
    script = tmp_path / "run_daemon.py"
    script.write_text(WRAPPER.format(root=str(REPO_ROOT)))
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "AUDITOR_DATA_DIR": str(tmp_path / "data"),
           "AUDITOR_DATABASE_URL": url, "AUDITOR_HUB_ENDPOINT": server.url,
           "CALLS_FILE": str(calls), "FAKE_DELAY": "1.0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    log = (tmp_path / "daemon.log").open("w")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT)

    def depth() -> Any:
        with factory() as session:
            return queries.queue_depth(session)

    proc = start()
    try:
        def mid_audit() -> bool:
            d = depth()
            started = len(calls.read_text().split()) if calls.exists() else 0
            # The running audit is inside the orchestrator, not just claimed.
            return d.done >= 1 and d.running == 1 and started == d.done + 1

        # Generous: the daemon imports torch and transformers before its workers start.
        ok = wait_until(mid_audit, timeout=180, interval=0.05)
        assert ok, (tmp_path / "daemon.log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        with factory() as session:
            before = {r["id"]: r for r in audit_rows(session)}
        killed = [r for r in before.values() if r["status"] == "running"]
        finished = [r for r in before.values() if r["status"] == "done"]
        assert len(killed) == 1 and finished

        proc = start()
        assert wait_until(lambda: depth().done == len(DERIVATIVES), timeout=180), \
            (tmp_path / "daemon.log").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    with factory() as session:
        after = {r["id"]: r for r in audit_rows(session)}
    # One audit per revision, all done; finished ones untouched by the restart.
    assert sorted(r["repo_id"] for r in after.values()) == sorted(DERIVATIVES), dump(after)
    assert {r["status"] for r in after.values()} == {"done"}
    for r in finished:
        assert after[r["id"]]["finished_at"] == r["finished_at"]
        assert after[r["id"]]["attempts"] == 1
    # The killed audit ran again (from scratch) and only it.
    ran = Counter(calls.read_text().split())
    assert ran[killed[0]["repo_id"]] == 2
    assert all(n == 1 for repo, n in ran.items() if repo != killed[0]["repo_id"]), ran
    assert sum(ran.values()) == len(DERIVATIVES) + 1
    assert after[killed[0]["id"]]["attempts"] == 1  # the kill did not spend an attempt

