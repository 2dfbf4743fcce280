"""The store under concurrency and failure: concurrent first runs, saves that fail,
expired leases, and the first audit of a process run from 4 threads at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from auditor.daemon.worker import RetryPolicy, WorkerPool, run_one
from auditor.hub.client import HubClient
from auditor.settings import Settings
from auditor.store import policy
from auditor.store import queue as store_queue
from auditor.store.db import make_engine, session_factory, upgrade_database
from auditor.store.models import Audit
from tests import hostile_corpus as hc
from tests.test_daemon_support import BASE, DERIVATIVES, FakeAudit, make_zoo

REPO_ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITOR_")}
    env.update({"AUDITOR_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1",
                "AUDITOR_CACHE_DIR": str(tmp_path / "cache"), **extra})
    return env


def test_eight_concurrent_first_run_store_audits_lose_nothing(tmp_path: Path) -> None:
    """8 ``auditor audit ... --store`` at once on a fresh data directory: 8 audits stored."""
    marker = tmp_path / "PAYLOAD-RAN"
    pickles = hc.gadgets(marker)
    folders = []
    for i in range(8):
        folder = tmp_path / "local" / f"model-{i}"
        folder.mkdir(parents=True)
        (folder / "pytorch_model.bin").write_bytes(pickles["os_system"])
        folders.append(folder)
    env = _env(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "auditor.cli", "audit", str(f), "--store",
                               "-q", "--output", str(tmp_path / f"r{i}.json")],
                              env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, f in enumerate(folders)]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    for code, err in outcomes:
        assert code == 1, err  # the gadget's finding; never a crash
        assert "Traceback" not in err and "locked" not in err, err
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'auditor.db'}")
    with session_factory(engine)() as session:
        audits = list(session.scalars(select(Audit)))
        assert len(audits) == 8 and {a.status for a in audits} == {"done"}
        assert {a.revision.repo.repo_id for a in audits} == {
            f"local/model-{i}" for i in range(8)}
    engine.dispose()
    assert not marker.exists()


@pytest.fixture
def work_queue(tmp_path: Path, hub_root: Path, hub_server: Any, hf_cache: Path) -> Any:
    from auditor.daemon.crawler import crawl_base

    make_zoo(hub_root)
    server = hub_server(hub_root)
    client = HubClient(endpoint=server.url, token=None, cache_dir=hf_cache,
                       disk_budget_bytes=None, backoff_seconds=0.01, max_wait_seconds=0.1)
    url = f"sqlite:///{tmp_path / 'auditor.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    with factory() as session:
        policy.watch_add(session, repo_id=BASE)
        crawl_base(session, client, BASE, config_hash="h")
    yield factory, client, Settings(data_dir=tmp_path / "data", database_url=url)
    engine.dispose()


def test_worker_that_cannot_save_fails_the_audit_with_the_reason(
        work_queue: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    factory, client, settings = work_queue
    import auditor.daemon.worker as worker

    def refuse(*_a: Any, **_k: Any) -> None:
        raise ValueError("Out of range float values are not JSON compliant")

    monkeypatch.setattr(worker, "save_result", refuse)
    monkeypatch.setattr(worker, "SAVE_BACKOFF_SECONDS", 0.01)
    assert run_one(factory, client, settings, worker_id="h:1:1", audit_fn=FakeAudit(),
                   retry=RetryPolicy(max_attempts=1, backoff_seconds=0.01))
    with factory() as session:
        audits = list(session.scalars(select(Audit)))
    failed = [a for a in audits if a.status == "failed"]
    assert len(failed) == 1 and "could not save the result" in failed[0].error
    assert "Out of range float" in failed[0].error
    assert not [a for a in audits if a.status == "running"]


def test_drain_requeues_expired_leases_itself(work_queue: Any) -> None:
    """An audit left running by a dead worker: crawl --once's drain takes it back and ends."""
    factory, client, settings = work_queue
    with factory() as session:
        audit = store_queue.claim_next_audit(session, worker_id="dead:1:1", lease_seconds=0.01)
        assert audit is not None
    fake = FakeAudit()
    pool = WorkerPool(factory, client, settings, workers=1, audit_fn=fake, poll_seconds=0.05,
                      retry=RetryPolicy(max_attempts=5, backoff_seconds=0.01))
    pool.drain()  # returns: the expired lease was requeued and audited
    with factory() as session:
        statuses = [a.status for a in session.scalars(select(Audit))]
    assert statuses.count("done") == len(DERIVATIVES), statuses


def test_four_threads_run_the_first_audit_of_a_process(small_zoo: Any, tmp_path: Path) -> None:
    """In a fresh process (nothing imported yet), 4 threads audit at once with every
    detector: no detector crashes (the transformers lazy-import race)."""
    from auditor_testkit.hub.server import HubServer

    server = HubServer(small_zoo.root).start()
    try:
        script = textwrap.dedent(f"""
            import json, sys, threading
            from auditor.orchestrator import audit_revision
            from auditor.settings import Settings
            settings = Settings(hub_endpoint={server.url!r}, data_dir={str(tmp_path)!r},
                                barrier_points=3)
            repos = ["carol/tiny-animals", "alice/tiny-copy", "bob/tiny-kv",
                     "carol/tiny-animals"]
            errors, crashes = [], []
            def run(repo):
                try:
                    # barrier builds the model and tokenizer: the lazy transformers names
                    out = audit_revision(repo, settings=settings, detectors=[
                        "pickles", "weights", "lineage", "barrier"])
                    errors.extend(f"{{e.detector}}: {{e.kind}}: {{e.message}}"
                                  for e in out.report.errors)
                except Exception as exc:
                    crashes.append(repr(exc))
            threads = [threading.Thread(target=run, args=(r,)) for r in repos]
            [t.start() for t in threads]
            [t.join() for t in threads]
            print(json.dumps({{"errors": errors, "crashes": crashes}}))
        """)
        proc = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path),
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["crashes"] == []
    assert not [e for e in result["errors"] if ": internal: " in e or "Import" in e], result


def test_internal_error_exits_2_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    from auditor import cli
    from auditor.hub.client import HubClient

    def boom(*_a: Any, **_k: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(HubClient, "resolve", boom)  # a bug anywhere in the audit path
    for debug in (False, True):
        monkeypatch.setattr(sys, "argv", ["auditor", *(["--debug"] if debug else []),
                                          "audit", "org/x", "-q"])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert ("Traceback" in err) == debug, err
        if not debug:
            assert err.strip().count("\n") == 0 and "internal error: KeyError" in err
