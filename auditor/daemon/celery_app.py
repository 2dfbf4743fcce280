"""The Celery backend: one task, ``auditor.run_audit(audit_id)``, on RabbitMQ.

``celery -A auditor.daemon.celery_app worker`` (or ``auditor worker``) runs it on any
machine that reaches the broker and the database; ``auditor daemon --backend celery``
publishes the messages (``auditor.daemon.celery_scheduler``).

Why nothing is lost and nothing runs twice
------------------------------------------
The audits table is the queue of record; its lease (``worker_id`` + ``lease_expires_at``,
renewed every lease/3 while the orchestrator runs) is the only answer to "who audits
what". A broker message is only a hint, "audit N may be due":

* The task first claims audit N with one guarded UPDATE (``celery_store.claim_audit``):
  queued and due, or running under an *expired* lease. A second delivery of the same
  message, while the first is alive (its lease renewed) or after it finished, matches
  nothing and is acknowledged as a no-op. So at-least-once delivery becomes
  exactly-once auditing, whatever the broker does.
* acks_late + reject_on_worker_lost: the message is acknowledged after the task returns,
  so a worker killed with SIGKILL (its connection drops, or its pool process dies) never
  loses it: RabbitMQ redelivers it. Early ack would lose that message, and the audit
  would wait for the lease to expire and the scheduler to publish it again.
* An audit longer than RabbitMQ's ``consumer_timeout`` (default 30 min; with acks_late
  the running task's message stays unacknowledged): the broker closes the channel and
  redelivers the message. The redelivery finds the lease alive and does nothing; the
  first worker reconnects (``broker_channel_error_retry``), carries on
  (``worker_cancel_long_running_tasks_on_connection_loss`` is off) and records the
  result under its lease. The audit is not started a second time (tests/test_celery.py
  proves it with a 1.5 s consumer_timeout and an 8 s audit).
* A worker that died: its lease expires (no renewal). The redelivered message, or the
  scheduler (``requeue_expired`` + a new message for every due audit whose message may be
  gone), lets another worker take it over; the dead worker's late write, if any, is
  refused because it no longer holds the lease (``complete_audit`` checks the holder).
* Results are written once per audit row (fingerprint upsert, then ``complete_audit``
  which replaces comparisons and findings), keyed by (revision, analysis version,
  config hash), so even a takeover leaves one set of findings.

SIGTERM: Celery's warm shutdown stops consuming and lets running audits finish; after
``worker_grace_seconds`` the pool processes are told to give their audit back to the
queue (``release_audit``) and exit, and the message is requeued.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog
from celery import Celery, signals
from kombu import Exchange, Queue

from auditor.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from auditor.daemon.worker import RetryPolicy
    from auditor.hub.client import HubClient

log = structlog.get_logger("auditor.daemon.celery")

TASK_NAME = "auditor.run_audit"
QUEUE_KINDS = ("cpu", "gpu")
QUEUES_ENV = "AUDITOR_WORKER_QUEUES"


def queue_name(settings: Settings, kind: str) -> str:
    return f"{settings.queue_prefix}.{kind}"


def _device_name(spec: str) -> str:
    """What the heartbeat shows: the device "auto" resolves to on this worker."""
    try:
        from auditor.analysis.compute import resolve_device

        return resolve_device(spec).type
    except Exception:  # a bad AUDITOR_DEVICE fails the audit, not the heartbeat
        return spec


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (broker, queue names)."""
    settings = settings or Settings()
    app = Celery("auditor", broker=settings.broker_url.get_secret_value(), set_as_current=False)
    names = [queue_name(settings, k) for k in QUEUE_KINDS]
    app.conf.update(
        task_acks_late=True,  # see the module docstring
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # One message per pool process: a message waiting in a busy worker's buffer would
        # be unacknowledged for as long as the audit before it (consumer_timeout).
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # RabbitMQ's consumer_timeout closes the channel (PRECONDITION_FAILED): reconnect
        # and keep running audits, instead of Celery's default "unrecoverable" shutdown.
        broker_channel_error_retry=True,
        # JSON only: a pickled message would run code from whoever can publish.
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_ignore_result=True,
        # One direct exchange per deployment, one durable queue per kind.
        task_queues=[Queue(n, Exchange(settings.queue_prefix, type="direct", durable=True),
                           routing_key=n, durable=True) for n in names],
        task_default_queue=names[0],
        task_create_missing_queues=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_enable_remote_control=False,
        task_always_eager=False,
    )
    app.task(name=TASK_NAME, bind=True)(_run_audit_task)
    return app


# --- per-process worker state ----------------------------------------------------------
@dataclass
class WorkerContext:
    """What one pool process needs: built after the fork (engines do not survive one)."""

    pid: int
    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    client: HubClient
    worker_id: str
    queues: list[str]
    retry: RetryPolicy
    current: int | None = None
    # Re-entrant: the SIGTERM handler may beat while the main thread is inside beat().
    lock: threading.RLock = field(default_factory=threading.RLock)
    stop: threading.Event = field(default_factory=threading.Event)

    def beat(self, *, done: int = 0, failed: int = 0, stopped: bool = False) -> None:
        from auditor.daemon.celery_store import heartbeat

        try:
            with self.lock, self.factory() as session:
                heartbeat(session, worker_id=self.worker_id, pid=self.pid,
                          queues=self.queues, device=_device_name(self.settings.device),
                          current_audit_id=self.current, done=done, failed=failed,
                          stopped=stopped)
        except Exception as exc:  # a DB hiccup must not fail the audit: next beat retries
            log.warning("heartbeat failed", worker=self.worker_id, error=str(exc))


_context: WorkerContext | None = None
_context_lock = threading.Lock()
# Set in the main process when the worker starts shutting down (see _on_process_init).
_shutting_down = threading.Event()


def worker_context() -> WorkerContext:
    """This process's context (rebuilt in a forked child)."""
    global _context
    with _context_lock:
        if _context is not None and _context.pid == os.getpid():
            return _context
        from auditor.daemon.worker import RetryPolicy
        from auditor.hub.client import HubClient
        from auditor.store.db import make_engine, normalize_url, session_factory
        from auditor.store.queue import worker_prefix

        settings = Settings()
        engine = make_engine(normalize_url(settings.resolved_database_url))
        queues = [q for q in os.environ.get(QUEUES_ENV, "").split(",") if q]
        ctx = WorkerContext(
            pid=os.getpid(), settings=settings, engine=engine,
            factory=session_factory(engine), client=HubClient.from_settings(settings),
            # host:pid:n like the in-process pool: requeue_dead_local understands it.
            worker_id=f"{worker_prefix()}:1", queues=queues or [queue_name(settings, "cpu")],
            retry=RetryPolicy(max_attempts=settings.max_attempts,
                              backoff_seconds=settings.retry_backoff_seconds),
        )
        _context = ctx
    ctx.beat()
    threading.Thread(target=_heartbeat_loop, args=(ctx,), name="heartbeat",
                     daemon=True).start()
    return ctx


def _heartbeat_loop(ctx: WorkerContext) -> None:
    while not ctx.stop.wait(max(0.2, ctx.settings.worker_heartbeat_seconds)):
        ctx.beat()


# --- the task ----------------------------------------------------------------------------
def _run_audit_task(task: Any, audit_id: int) -> str:
    redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
    return run_dispatched_audit(int(audit_id), redelivered=redelivered)


def run_dispatched_audit(audit_id: int, *, redelivered: bool = False) -> str:
    """Claim audit ``audit_id`` and run it through the in-process pool's code path;
    a message for an audit someone else holds, or that is finished, is a no-op."""
    from auditor.daemon.celery_store import claim_audit
    from auditor.daemon.worker import execute_claimed
    from auditor.store.models import Audit

    ctx = worker_context()
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) is not _release_and_exit:
        # Here, not in worker_process_init: billiard resets the signals after that hook.
        signal.signal(signal.SIGTERM, _release_and_exit)
    lease = ctx.settings.lease_seconds
    with ctx.factory() as session:
        claim = claim_audit(session, audit_id, worker_id=ctx.worker_id, lease_seconds=lease,
                            max_attempts=ctx.retry.max_attempts)
    if not claim.claimed:
        log.info("message ignored: audit not claimable", audit=audit_id, status=claim.status,
                 holder=claim.holder, redelivered=redelivered, worker=ctx.worker_id,
                 lease_expires_at=claim.lease_expires_at.isoformat()
                 if claim.lease_expires_at else None)
        return f"ignored:{claim.status}"
    ctx.current = audit_id
    ctx.beat()
    try:
        execute_claimed(ctx.factory, ctx.client, ctx.settings, audit_id=audit_id,
                        attempt=claim.attempts, worker_id=ctx.worker_id, lease_seconds=lease,
                        retry=ctx.retry)
    finally:
        ctx.current = None
    with ctx.factory() as session:
        row = session.get(Audit, audit_id)
        status = row.status if row is not None else "missing"
        ours = row is not None and row.worker_id == ctx.worker_id
        session.rollback()
    done = status == "done" and ours
    ctx.beat(done=int(done), failed=int(status in ("failed", "queued")))
    return status


# --- signals: worker process start, SIGTERM --------------------------------------------
@signals.celeryd_init.connect
def _on_worker_init(sender: Any = None, instance: Any = None, conf: Any = None,
                    options: dict[str, Any] | None = None, **_: Any) -> None:
    """Main process, before the pool forks: queues and device for the children."""
    queues = (options or {}).get("queues") or []
    if isinstance(queues, str):
        queues = queues.split(",")
    names = [str(q) for q in queues]
    if names:
        os.environ[QUEUES_ENV] = ",".join(names)
    if any(n.endswith(".gpu") or n == "gpu" for n in names):
        # Behavioural checks of a gpu worker run on CUDA (Settings.device).
        os.environ["AUDITOR_DEVICE"] = "cuda"


@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    """A pool process: one torch thread unless told otherwise, its context and heartbeat
    (SIGTERM = give the running audit back, installed by the task)."""
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
    if _shutting_down.is_set():
        # billiard replaces a pool process that gave its audit back even while the worker
        # shuts down; that stand-in (forked from the main process, so it inherits the flag)
        # takes no task and must not register as a worker of its own.
        return
    worker_context()


def _release_and_exit(signum: int, _frame: FrameType | None) -> None:
    from auditor.store.queue import release_audit

    ctx = _context
    if ctx is not None and ctx.pid == os.getpid():
        ctx.stop.set()
        audit_id = ctx.current
        if audit_id is not None:
            try:
                with ctx.factory() as session:
                    released = release_audit(session, audit_id=audit_id,
                                             worker_id=ctx.worker_id)
                log.warning("audit given back on shutdown", audit=audit_id, requeued=released,
                            worker=ctx.worker_id)
            except Exception as exc:  # the lease expires and it is re-queued anyway
                log.warning("could not release audit", audit=audit_id, error=str(exc))
            ctx.current = None
        ctx.beat(stopped=True)
    os._exit(0)


@signals.worker_shutting_down.connect
def _on_shutting_down(sig: str = "", how: str = "", **_: Any) -> None:
    """Main process, SIGTERM (warm shutdown): running audits get ``worker_grace_seconds``
    to finish; then the pool processes release them and exit."""
    _shutting_down.set()
    if how != "Warm":
        return
    grace = Settings().worker_grace_seconds

    def expire() -> None:
        for pid in _children(os.getpid()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)

    timer = threading.Timer(max(0.0, grace), expire)
    timer.daemon = True
    timer.start()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task_dir in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            out += [int(p) for p in (task_dir / "children").read_text().split()]
    return out


app = make_app()
