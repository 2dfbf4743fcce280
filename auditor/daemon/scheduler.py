"""The long-running daemon: APScheduler crawl jobs + a pool of audit workers.

Jobs live in the auditor's own database (``apscheduler_jobs`` table, SQLAlchemyJobStore):
one crawl job per watched base (id ``crawl:<base>``), a queue job (expired leases back
to the queue, queue gauges) and a sync job that follows ``watch add/remove``. Persisted
jobs hold only a textual function reference and the base id; the functions find the
running ``Daemon`` through a module global (one daemon per process).

Shutdown (SIGTERM/SIGINT): stop claiming, let running audits finish within the grace
period, then give unfinished ones back to the queue. After a SIGKILL the leases of the
dead process's audits are released at the next start (same host) or expire
(``requeue_expired``), so nothing is lost and finished audits are never repeated.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from auditor.daemon import metrics
from auditor.daemon.crawler import CrawlResult, crawl_all, crawl_base
from auditor.daemon.worker import DEFAULT_LEASE_SECONDS, AuditFn, RetryPolicy, WorkerPool
from auditor.settings import analysis_config_hash
from auditor.store import policy, queries, queue
from auditor.store.queue import requeue_dead_local

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from auditor.hub.client import HubClient
    from auditor.settings import Settings

log = structlog.get_logger("auditor.daemon")

JOBS_TABLE = "apscheduler_jobs"
CRAWL_PREFIX = "crawl:"
QUEUE_JOB_ID = "queue"
SYNC_JOB_ID = "sync-watched"

_current: Daemon | None = None


def _daemon() -> Daemon:
    if _current is None:
        raise RuntimeError("no daemon running in this process")
    return _current


# Job functions: referenced by name from the persistent job store.
def crawl_job(base_repo_id: str) -> None:
    _daemon().crawl(base_repo_id)


def queue_job() -> None:
    _daemon().tick()


def sync_job() -> None:
    _daemon().sync_jobs()


def crawl_job_id(base_repo_id: str) -> str:
    return CRAWL_PREFIX + base_repo_id


class Daemon:
    def __init__(
        self,
        *,
        settings: Settings,
        database_url: str,
        client: HubClient,
        workers: int,
        interval_seconds: float,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        retry: RetryPolicy | None = None,
        grace_seconds: float = 60.0,
        poll_seconds: float = 1.0,
        queue_interval_seconds: float = 5.0,
        misfire_grace_seconds: int = 300,
        audit_fn: AuditFn | None = None,
    ) -> None:
        from auditor.store.db import make_engine, session_factory

        self.settings = settings
        self.database_url = database_url
        self.client = client
        self.interval_seconds = max(1.0, float(interval_seconds))
        self.grace_seconds = grace_seconds
        self.queue_interval_seconds = queue_interval_seconds
        self.misfire_grace_seconds = misfire_grace_seconds
        self.engine = make_engine(database_url)
        self.session_factory = session_factory(self.engine)
        self.config_hash = analysis_config_hash(settings)
        self.pool = WorkerPool(self.session_factory, client, settings, workers=workers,
                               lease_seconds=lease_seconds, retry=retry, audit_fn=audit_fn,
                               poll_seconds=poll_seconds)
        self.scheduler: BackgroundScheduler | None = None
        self.stop_requested = threading.Event()

    # ----- jobs ---------------------------------------------------------------------
    def crawl(self, base_repo_id: str) -> CrawlResult:
        with self.session_factory() as session:
            result = crawl_base(session, self.client, base_repo_id,
                                config_hash=self.config_hash)
        log.info("crawl", base=base_repo_id, ok=result.ok, listed=result.listed,
                 queued=len(result.queued), skipped=len(result.skipped), error=result.error)
        return result

    def recover(self) -> int:
        """Give audits of dead holders back to the queue (expired leases, or a killed
        daemon on this host)."""
        with self.session_factory() as session:
            expired = queue.requeue_expired(session)
            dead = requeue_dead_local(session)
        if expired or dead:
            log.info("requeued interrupted audits", expired_leases=expired,
                     dead_workers=dead)
        return expired + dead

    def tick(self) -> None:
        self.recover()
        with self.session_factory() as session:
            metrics.update_queue(queries.queue_depth(session))

    def sync_jobs(self) -> None:
        """One crawl job per watched base; jobs of unwatched bases removed."""
        scheduler = self.scheduler
        if scheduler is None:
            return
        with self.session_factory() as session:
            bases = {w.repo_id for w in policy.watch_list(session)}
        jobs = {j.id: j for j in scheduler.get_jobs() if j.id.startswith(CRAWL_PREFIX)}
        for job_id in jobs.keys() - {crawl_job_id(b) for b in bases}:
            scheduler.remove_job(job_id)
            log.info("crawl job removed", job=job_id)
        for base in sorted(bases):
            job = jobs.get(crawl_job_id(base))
            interval = getattr(job.trigger, "interval", None) if job is not None else None
            if interval is not None and interval.total_seconds() == self.interval_seconds:
                continue  # keep the persisted schedule (a restart does not re-crawl at once)
            scheduler.add_job(
                "auditor.daemon.scheduler:crawl_job", "interval", args=[base],
                id=crawl_job_id(base), name=f"crawl {base}", seconds=self.interval_seconds,
                replace_existing=True, next_run_time=datetime.now(UTC),
            )
            log.info("crawl job scheduled", base=base, interval=self.interval_seconds)

    # ----- lifecycle ----------------------------------------------------------------
    def _make_scheduler(self) -> BackgroundScheduler:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
        from apscheduler.schedulers.background import BackgroundScheduler

        return BackgroundScheduler(
            # Our engine: SQLite gets WAL and a busy timeout shared with the store.
            jobstores={"default": SQLAlchemyJobStore(engine=self.engine, tablename=JOBS_TABLE)},
            executors={"default": ThreadPoolExecutor(max_workers=4)},
            job_defaults={"coalesce": True, "max_instances": 1,
                          "misfire_grace_time": self.misfire_grace_seconds},
            timezone=UTC,
        )

    def start(self) -> None:
        global _current
        if _current is not None and _current is not self:
            raise RuntimeError("another daemon already runs in this process")
        _current = self
        if self.settings.metrics_port:
            metrics.serve(self.settings.metrics_port)
        self.recover()
        self.pool.start()
        scheduler = self._make_scheduler()
        self.scheduler = scheduler
        scheduler.start()
        scheduler.add_job("auditor.daemon.scheduler:queue_job", "interval",
                          id=QUEUE_JOB_ID, seconds=self.queue_interval_seconds,
                          replace_existing=True, next_run_time=datetime.now(UTC))
        scheduler.add_job("auditor.daemon.scheduler:sync_job", "interval", id=SYNC_JOB_ID,
                          seconds=min(60.0, self.interval_seconds), replace_existing=True)
        self.sync_jobs()
        log.info("daemon started", workers=self.pool.workers, interval=self.interval_seconds)

    def stop(self, *, grace_seconds: float | None = None) -> bool:
        """Stop scheduling and claiming; True if every running audit finished in time."""
        global _current
        grace = self.grace_seconds if grace_seconds is None else grace_seconds
        if self.scheduler is not None and self.scheduler.running:
            # Do not wait for a crawl in progress: it is idempotent and re-runs next time.
            self.scheduler.shutdown(wait=False)
        clean = self.pool.stop(grace_seconds=grace)
        log.info("daemon stopped", clean=clean)
        if _current is self:
            _current = None
        return clean

    def run_forever(self, *, install_signals: bool = True) -> bool:
        """Start, block until SIGTERM/SIGINT (or ``stop_requested``), stop."""
        if install_signals:
            self._install_signals()
        self.start()
        try:
            while not self.stop_requested.wait(1.0):
                pass
        finally:
            clean = self.stop()
        return clean

    def run_once(self, *, progress: Callable[[str, str], None] | None = None) -> list[CrawlResult]:
        """Crawl every watched base once and run the queue to completion (cron mode)."""
        global _current
        _current = self
        try:
            self.recover()
            with self.session_factory() as session:
                results = crawl_all(session, self.client, self.settings, progress=progress)
            self.pool.drain()
            with self.session_factory() as session:
                metrics.update_queue(queries.queue_depth(session))
        finally:
            _current = None
        return results

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal received", signal=signal.Signals(signum).name)
            if self.stop_requested.is_set():
                return
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def close(self) -> None:
        self.engine.dispose()


def wait_until(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds (tests and ``status --wait``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
