"""``auditor daemon --backend celery``: the one scheduler. It crawls (the same APScheduler
jobs as the in-process daemon) and, instead of running audits, publishes one
``auditor.run_audit`` message per due audit to the ``cpu`` or ``gpu`` queue.

Messages are hints (see ``auditor.daemon.celery_app``): an audit is published when it
becomes due, again when its row went back to the queue since (re-queued after a dead
worker, released on shutdown, retried after a failure, re-queued for a dependent), and
again when its queue in the broker holds no ready message while the audit has waited
``redispatch_seconds`` (a message lost with a broker restart). Duplicates cost one
no-op claim.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import Gauge

from auditor.daemon import metrics
from auditor.daemon.celery_app import QUEUE_KINDS, TASK_NAME, make_app, queue_name
from auditor.daemon.celery_store import DueAudit, due_audits, running_audit_ids, workers_seen
from auditor.daemon.scheduler import Daemon
from auditor.store import catalog, queries
from auditor.store.queries import pending_count

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session, sessionmaker

    from auditor.hub.client import HubClient
    from auditor.settings import Settings

log = structlog.get_logger("auditor.daemon.celery")

BROKER_QUEUE_DEPTH = Gauge("auditor_broker_queue_messages",
                           "Messages ready in the broker, per audit queue.", ["queue"])
BROKER_CONSUMERS = Gauge("auditor_broker_queue_consumers",
                         "Consumers (worker processes) of each audit queue.", ["queue"])
WORKER_RATE = Gauge("auditor_worker_audits_per_minute",
                    "Audits a worker finished per minute over the last 5 minutes.",
                    ["worker"])
WORKER_FAILURES = Gauge("auditor_worker_failures",
                        "Failed audit attempts of a worker since it started.", ["worker"])
WORKERS_SEEN = Gauge("auditor_workers_seen", "Workers with a heartbeat in the last 5 minutes.")


def route(settings: Settings, audit: DueAudit) -> str:
    """The queue of an audit. With GPU workers deployed (``AUDITOR_GPU_QUEUE=1``), an
    audit runs in two passes: the weight analysis (fingerprint, lineage, rules) on a
    ``cpu`` worker, which defers the behavioural checks (``Settings.defer_behaviour_bytes``,
    ``orchestrator.behaviour_deferred``), then the behavioural pass on ``gpu``. Models the
    behavioural checks cannot run (adapters alone, pickles, unknown files) stay on ``cpu``.
    Either pass is the same task and code path; the route only sends the work that runs
    models to the machines that run them fast."""
    kind = ("gpu" if settings.gpu_queue and audit.behaviour_pending and audit.behavioural
            else "cpu")
    return queue_name(settings, kind)


class Dispatcher:
    """Stands in for ``WorkerPool`` in the daemon: publishes instead of running."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings, *,
                 app: Celery | None = None, client: HubClient | None = None,
                 poll_seconds: float = 1.0, redispatch_seconds: float = 60.0) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.client = client
        self.app = app or make_app(settings)
        self.poll_seconds = poll_seconds
        self.redispatch_seconds = redispatch_seconds
        self.workers = 0  # runs no audit itself
        self.on_done: Callable[[], None] | None = None
        self.stop_event = threading.Event()
        self._sent: dict[int, tuple[tuple[Any, ...], float]] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.published = 0

    # ----- broker ------------------------------------------------------------------
    def queue_depths(self) -> dict[str, tuple[int, int]]:
        """(ready messages, consumers) per audit queue; declares the queues."""
        out: dict[str, tuple[int, int]] = {}
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            for q in self.app.conf.task_queues:
                bound = q(channel)
                bound.declare()
                _, ready, consumers = bound.queue_declare(passive=True)
                out[q.name] = (int(ready), int(consumers))
        return out

    def dispatch_once(self) -> int:
        """Publish the due audits that need a message; returns how many were sent."""
        with self._lock:
            with self.session_factory() as session:
                due = due_audits(session)
                running = running_audit_ids(session)
            depths = self.queue_depths()
            now = time.monotonic()
            todo: list[tuple[DueAudit, str]] = []
            for audit in due:
                if self.settings.gpu_queue and audit.files is None \
                        and audit.audit_id not in self._sent:
                    audit = self._with_files(audit)
                queue = route(self.settings, audit)
                sent = self._sent.get(audit.audit_id)
                lost = (sent is not None and depths.get(queue, (1, 0))[0] == 0
                        and now - sent[1] >= self.redispatch_seconds)
                if sent is None or sent[0] != audit.state or lost:
                    todo.append((audit, queue))
            if todo:
                with self.app.producer_or_acquire() as producer:
                    for audit, queue in todo:
                        self.app.send_task(TASK_NAME, args=[audit.audit_id], queue=queue,
                                           routing_key=queue, producer=producer)
                        self._sent[audit.audit_id] = (audit.state, now)
            # Forget what is no longer queued nor running (done, failed): keeps the map
            # small. A running audit is remembered: given back (shutdown), its message is
            # redelivered by the broker, and publishing again would only duplicate it.
            keep = {a.audit_id for a in due} | running
            for audit_id in [a for a in self._sent if a not in keep]:
                del self._sent[audit_id]
            self.published += len(todo)
            for name, (ready, consumers) in depths.items():
                BROKER_QUEUE_DEPTH.labels(queue=name).set(ready)
                BROKER_CONSUMERS.labels(queue=name).set(consumers)
        if todo:
            log.info("audits published", count=len(todo),
                     queues=sorted({q for _, q in todo}))
        return len(todo)

    def _with_files(self, audit: DueAudit) -> DueAudit:
        """The crawl's listing has no file names: resolve the revision once (one Hub API
        call) and keep its files in the store, to route it. A Hub error routes to cpu."""
        from dataclasses import replace

        if self.client is None:
            return audit
        try:
            resolved = self.client.resolve(audit.repo_id, revision=audit.sha)
            with self.session_factory() as session:
                catalog.upsert_revision(
                    session, repo_id=audit.repo_id, sha=audit.sha,
                    files=[{"path": p, "size": s} for p, s in sorted(resolved.files.items())])
        except Exception as exc:  # the worker's audit reports Hub trouble properly
            log.warning("route lookup failed", repo=audit.repo_id, error=str(exc))
            return audit
        return replace(audit, files=frozenset(resolved.files))

    def update_worker_metrics(self) -> None:
        with self.session_factory() as session:
            seen = workers_seen(session, minutes=5.0)
        WORKERS_SEEN.set(len(seen))
        for w in seen:
            WORKER_RATE.labels(worker=w.worker_id).set(w.audits_per_minute)
            WORKER_FAILURES.labels(worker=w.worker_id).set(w.audits_failed)

    # ----- the WorkerPool interface the Daemon uses ----------------------------------
    def _loop(self, *, until_empty: bool) -> None:
        while not self.stop_event.is_set():
            try:
                self.dispatch_once()
                if until_empty:
                    with self.session_factory() as session:
                        if pending_count(session) == 0:
                            return
            except Exception as exc:  # broker or database away: retry next period
                log.warning("dispatch failed", error=str(exc))
            self.stop_event.wait(self.poll_seconds)

    def drain(self) -> None:
        """Publish until every queued audit is done by the workers (``--once``)."""
        self._loop(until_empty=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, kwargs={"until_empty": False},
                                        name="dispatch", daemon=True)
        self._thread.start()

    def stop(self, *, grace_seconds: float) -> bool:
        # Audits run on the workers: stopping the scheduler interrupts none of them.
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, grace_seconds))
        return True


class CeleryDaemon(Daemon):
    """The daemon with a ``Dispatcher`` in place of the in-process pool."""

    def __init__(self, *, settings: Settings, poll_seconds: float = 1.0,
                 redispatch_seconds: float = 60.0, app: Celery | None = None,
                 **kwargs: Any) -> None:
        kwargs["workers"] = 1  # the in-process pool is built, never started
        super().__init__(settings=settings, poll_seconds=poll_seconds, **kwargs)
        self.pool = Dispatcher(self.session_factory, settings, app=app,  # type: ignore[assignment]
                               client=self.client, poll_seconds=poll_seconds,
                               redispatch_seconds=redispatch_seconds)

    def tick(self) -> None:
        super().tick()  # expired leases and dead local workers back to the queue
        try:
            self.pool.update_worker_metrics()  # type: ignore[attr-defined]
        except Exception as exc:
            log.warning("worker metrics failed", error=str(exc))

    def start(self) -> None:
        with self.session_factory() as session:
            metrics.update_queue(queries.queue_depth(session))
        log.info("celery backend", queues=[queue_name(self.settings, k) for k in QUEUE_KINDS],
                 gpu_routing=self.settings.gpu_queue)
        super().start()
