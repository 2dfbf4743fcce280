"""Two processes claim and complete audits from one database: nothing lost, nothing twice."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

from sqlalchemy import select

from auditor.store import catalog, queries, queue
from auditor.store.db import make_engine, session_factory
from auditor.store.models import Audit
from tests.test_store import make_report

N_AUDITS = 40


def _worker(url: str, worker_id: str, barrier: Any, results: Any) -> None:
    engine = make_engine(url)
    done: list[int] = []
    try:
        with session_factory(engine)() as session:
            barrier.wait(timeout=60)
            while True:
                audit = queue.claim_next_audit(session, worker_id=worker_id, lease_seconds=60)
                if audit is None:
                    break
                time.sleep(0.005)  # some "work", so the two workers interleave
                queue.complete_audit(
                    session, audit_id=audit.id, report=make_report(f"org/m{audit.id}"),
                    worker_id=worker_id,
                )
                done.append(audit.id)
    finally:
        engine.dispose()
        results.put((worker_id, done))


def test_two_processes_claim_each_audit_exactly_once(store_url: str, store_session: Any) -> None:
    for i in range(N_AUDITS):
        rev = catalog.upsert_revision(store_session, repo_id=f"org/m{i}", sha=f"{i:040x}")
        assert queue.queue_audit(store_session, revision_id=rev.id, analysis_version="1",
                                 config_hash="c")

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(store_url, f"w{n}", barrier, results)) for n in range(2)
    ]
    for p in procs:
        p.start()
    per_worker = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    claimed = per_worker["w0"] + per_worker["w1"]
    assert len(claimed) == N_AUDITS
    assert len(set(claimed)) == N_AUDITS  # no audit done twice
    assert per_worker["w0"] and per_worker["w1"]  # both really competed

    store_session.expire_all()
    audits = store_session.scalars(select(Audit)).all()
    assert {a.status for a in audits} == {"done"}
    assert {a.attempts for a in audits} == {1}
    by_worker = {a.id: a.worker_id for a in audits}
    for worker_id, ids in per_worker.items():
        assert all(by_worker[i] == worker_id for i in ids)
    assert queries.queue_depth(store_session).done == N_AUDITS
    assert len(queries.list_findings(store_session)) == 2 * N_AUDITS
