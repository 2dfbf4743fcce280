"""Run queued audits: claim with a lease, audit through the orchestrator, record.

``run_one`` does one audit; ``WorkerPool`` runs ``run_one`` on N threads, each with its
own session, until the queue is drained or it is told to stop.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.orm import Session, sessionmaker

from auditor.daemon import metrics
from auditor.errors import AuditorError, GatedRepo, RateLimited, StoreError, TransientHubError
from auditor.store import catalog, queue
from auditor.store.catalog import StoredHomologue, audit_target, stored_homologues
from auditor.store.dependents import requeue_dependents
from auditor.store.models import utcnow
from auditor.store.queries import next_due_at, pending_count, running_shas
from auditor.store.queue import release_audit, worker_prefix
from auditor.store.recording import save_result

if TYPE_CHECKING:
    from auditor.hub.client import HubClient
    from auditor.settings import Settings

log = structlog.get_logger("auditor.daemon.worker")

DEFAULT_LEASE_SECONDS = 300.0
SAVE_ATTEMPTS = 3
SAVE_BACKOFF_SECONDS = 0.5

AuditFn = Callable[..., Any]


@dataclass(frozen=True)
class RetryPolicy:
    """How failed audits are retried (the store's defaults; tests shrink them)."""

    max_attempts: int = queue.DEFAULT_MAX_ATTEMPTS
    backoff_seconds: float = queue.DEFAULT_BACKOFF_SECONDS


def _audit_fn() -> AuditFn:
    # Looked up at call time so the orchestrator can be wrapped (tests, instrumentation).
    from auditor import orchestrator

    return orchestrator.audit_revision  # type: ignore[no-any-return]


def _homologue_refs(stored: list[StoredHomologue]) -> dict[str, Any]:
    from auditor.analysis.fingerprint import Fingerprint, is_finite
    from auditor.detectors.context import HomologueRef

    refs: dict[str, Any] = {}
    for h in stored:
        try:
            fp = Fingerprint.from_bytes(h.fingerprint)
        except AuditorError as exc:
            # A bad stored fingerprint only removes that repo from the comparison set.
            log.warning("bad stored fingerprint", repo=h.repo_id, error=str(exc))
            continue
        if not is_finite(fp):
            log.warning("stored fingerprint holds non-finite values: left out", repo=h.repo_id)
            continue
        refs[h.repo_id] = HomologueRef(repo_id=h.repo_id, revision=h.revision,
                                       fingerprint=fp, backdoor=h.backdoor,
                                       created_at=h.created_at)
    return refs


class _LeaseRenewer(threading.Thread):
    """Keeps a long audit's lease alive; notes when the lease was lost."""

    def __init__(self, factory: sessionmaker[Session], audit_id: int, *, worker_id: str,
                 lease_seconds: float) -> None:
        super().__init__(name=f"lease-{audit_id}", daemon=True)
        self.factory = factory
        self.audit_id = audit_id
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.stop_event = threading.Event()
        self.lost = False

    def run(self) -> None:
        period = max(0.05, self.lease_seconds / 3)
        while not self.stop_event.wait(period):
            try:
                with self.factory() as session:
                    if not queue.renew_lease(session, audit_id=self.audit_id,
                                                  worker_id=self.worker_id,
                                                  lease_seconds=self.lease_seconds):
                        self.lost = True
                        log.warning("lease lost", audit=self.audit_id, worker=self.worker_id)
                        return
            except Exception as exc:  # a DB hiccup: try again next period
                log.warning("lease renewal failed", audit=self.audit_id, error=str(exc))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


def run_one(
    session_factory: sessionmaker[Session],
    client: HubClient,
    settings: Settings,
    *,
    worker_id: str,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    retry: RetryPolicy | None = None,
    audit_fn: AuditFn | None = None,
    on_claim: Callable[[int], None] | None = None,
    on_release: Callable[[int], None] | None = None,
) -> bool:
    """Claim and run the next due audit; ``False`` if none was claimable."""
    with session_factory() as session:
        audit = queue.claim_next_audit(session, worker_id=worker_id,
                                       lease_seconds=lease_seconds)
        if audit is None:
            return False
        audit_id, attempt = audit.id, audit.attempts
    execute_claimed(session_factory, client, settings, audit_id=audit_id, attempt=attempt,
                    worker_id=worker_id, lease_seconds=lease_seconds, retry=retry,
                    audit_fn=audit_fn, on_claim=on_claim, on_release=on_release)
    return True


def execute_claimed(
    session_factory: sessionmaker[Session],
    client: HubClient,
    settings: Settings,
    *,
    audit_id: int,
    attempt: int,
    worker_id: str,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    retry: RetryPolicy | None = None,
    audit_fn: AuditFn | None = None,
    on_claim: Callable[[int], None] | None = None,
    on_release: Callable[[int], None] | None = None,
) -> None:
    """Run an audit ``worker_id`` holds the lease of: renew the lease while the
    orchestrator runs, record the result (or the failure). The one code path of the
    in-process pool and the Celery task alike."""
    retry = retry or RetryPolicy()
    with session_factory() as session:
        target = audit_target(session, audit_id=audit_id)
    if on_claim is not None:
        on_claim(audit_id)
    bound = log.bind(audit=audit_id, repo=target.repo_id, sha=target.sha[:12],
                     worker=worker_id, attempt=attempt)
    renewer = _LeaseRenewer(session_factory, target.audit_id, worker_id=worker_id,
                            lease_seconds=lease_seconds)
    renewer.start()
    started = time.monotonic()
    try:
        _run_claimed(session_factory, client, settings, target=target, worker_id=worker_id,
                     retry=retry, audit_fn=audit_fn or _audit_fn(), log=bound)
    finally:
        renewer.stop()
        if on_release is not None:
            on_release(target.audit_id)
    bound.info("audit finished", seconds=round(time.monotonic() - started, 3))
    _enforce_budget(session_factory, client)


def _run_claimed(
    factory: sessionmaker[Session],
    client: HubClient,
    settings: Settings,
    *,
    target: Any,
    worker_id: str,
    retry: RetryPolicy,
    audit_fn: AuditFn,
    log: Any,
) -> None:
    try:
        homologues: Mapping[str, Any] = {}
        if target.base_repo_id is not None:
            with factory() as session:
                stored = stored_homologues(session, base_repo_id=target.base_repo_id,
                                           exclude_repo_id=target.repo_id,
                                           analysis_version=target.analysis_version)
            homologues = _homologue_refs(stored) if stored else {}
        # A revision already audited is updated incrementally (a new homologue arrived):
        # its fingerprint is cached, lineage and rules re-run, behaviour carried over.
        # A first pass that deferred the behavioural checks gets its second, full pass
        # instead (the fingerprint is a cache hit there too).
        previous = _previous_report(factory, target.audit_id)
        second = previous is not None and bool(
            (previous.get("coverage") or {}).get("behaviour_deferred"))
        extra: dict[str, Any] = ({"previous": previous}
                                 if previous is not None and not second else {})
        # local=False: a crawled repo id is a Hub id, even when a folder of that name
        # exists in the daemon's working directory.
        log.info("audit started", base=target.base_repo_id, homologues=len(homologues),
                 incremental=bool(extra), behaviour_pass=second)
        outcome = audit_fn(target.repo_id, revision=target.sha, base=target.base_repo_id,
                           homologues=homologues, settings=settings, client=client,
                           local=False, defer_behaviour=not second, **extra)
    except GatedRepo as exc:
        with factory() as session:
            catalog.upsert_repo(session, repo_id=target.repo_id, gated=True, skip_reason=str(exc))
            queue.skip_audit(session, audit_id=target.audit_id, reason=str(exc))
        metrics.AUDITS.labels(outcome="skipped").inc()
        log.info("audit skipped", reason=str(exc))
        return
    except (RateLimited, TransientHubError) as exc:
        retry_after = exc.retry_after if isinstance(exc, RateLimited) else None
        _fail(factory, target, worker_id, error=str(exc), retryable=True,
              retry=retry, retry_after=retry_after, log=log)
        return
    except AuditorError as exc:
        _fail(factory, target, worker_id, error=str(exc), retryable=False, retry=retry,
              retry_after=None, log=log)
        return
    except Exception as exc:
        # A bug must not kill the worker nor leave the audit running until its lease ends.
        log.error("audit crashed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        log.debug("audit crash traceback", exc_info=True)
        _fail(factory, target, worker_id, error=f"internal error: {type(exc).__name__}: {exc}",
              retryable=False, retry=retry, retry_after=None, log=log)
        return
    fingerprint = getattr(outcome, "fingerprint", None)
    requeued: list[Any] = []
    for attempt in range(1, SAVE_ATTEMPTS + 1):
        try:
            with factory() as session:
                save_result(session, audit_id=target.audit_id, revision_id=target.revision_id,
                            report=outcome.report, fingerprint=fingerprint,
                            analysis_version=target.analysis_version, worker_id=worker_id)
                requeued = (
                    requeue_dependents(session, revision_id=target.revision_id,
                                       analysis_version=target.analysis_version)
                    if fingerprint is not None else []
                )
            break
        except StoreError as exc:
            # Lost the lease (someone else re-ran it): their result stands.
            log.warning("audit result dropped", error=str(exc))
            return
        except Exception as exc:
            # The database refused the result (a value it cannot hold, a lock, a lost
            # connection): retry a few times, then fail this audit with the reason, so it
            # never stays "running" and a crawl --once still ends.
            reason = f"could not save the result: {type(exc).__name__}: {str(exc)[:300]}"
            log.warning("save failed", attempt=attempt, error=reason)
            if attempt == SAVE_ATTEMPTS:
                _fail(factory, target, worker_id, error=reason, retryable=False,
                      retry=retry, retry_after=None, log=log)
                return
            time.sleep(SAVE_BACKOFF_SECONDS * attempt)
    coverage = outcome.report.coverage
    kind = ("incremental" if coverage.get("incremental") else
            "behaviour" if second else "full")
    with _RUNS_LOCK:
        _RUNS[kind] += 1
    metrics.AUDITS.labels(outcome="updated" if kind == "incremental" else "done").inc()
    log.info("audit done", findings=len(outcome.report.findings), requeued=requeued,
             run=kind, behaviour_deferred=bool(coverage.get("behaviour_deferred")))


_RUNS_LOCK = threading.Lock()
_RUNS = {"full": 0, "incremental": 0, "behaviour": 0}


def run_counts() -> dict[str, int]:
    """Audit runs of this process: full audits (a first pass that deferred the behavioural
    checks counts as one), incremental updates and deferred behavioural passes (``auditor
    crawl`` prints them: a family audited in any upload order costs one full audit a
    revision, plus one behavioural pass for each large model)."""
    with _RUNS_LOCK:
        return dict(_RUNS)


def _previous_report(factory: sessionmaker[Session], audit_id: int) -> dict[str, Any] | None:
    """The report this audit row already holds (re-queued after a done run), if any."""
    from auditor.store.models import Audit

    with factory() as session:
        report = session.get(Audit, audit_id)
        data = report.report if report is not None else None
        session.rollback()
    return data if isinstance(data, dict) and data.get("subject") else None



def _fail(factory: sessionmaker[Session], target: Any, worker_id: str, *, error: str,
          retryable: bool, retry: RetryPolicy, retry_after: float | None, log: Any) -> None:
    try:
        with factory() as session:
            status = queue.fail_audit(
                session, audit_id=target.audit_id, error=error, retryable=retryable,
                worker_id=worker_id, max_attempts=retry.max_attempts,
                backoff_seconds=retry.backoff_seconds, retry_after=retry_after)
    except StoreError as exc:
        log.warning("failure not recorded", error=str(exc))
        return
    metrics.AUDITS.labels(outcome="retried" if status == "queued" else "failed").inc()
    log.warning("audit failed", error=error, retryable=retryable, status=status,
                retry_after=retry_after)


def _enforce_budget(factory: sessionmaker[Session], client: HubClient) -> None:
    budget = client.disk_budget_bytes
    if budget is None:
        return
    from auditor.hub.cache import enforce_disk_budget

    try:
        with factory() as session:
            protect = running_shas(session)
        freed = enforce_disk_budget(client.cache_dir, budget, protect=protect)
    except Exception as exc:  # eviction is housekeeping: never fail the worker for it
        log.warning("disk budget enforcement failed", error=str(exc))
        return
    if freed:
        log.info("cache evicted", freed_bytes=freed, budget_bytes=budget)


# --- the pool --------------------------------------------------------------------------
class WorkerPool:
    """N worker threads running ``run_one``; ``drain`` or ``start`` + ``stop``."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        client: HubClient,
        settings: Settings,
        *,
        workers: int,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        retry: RetryPolicy | None = None,
        audit_fn: AuditFn | None = None,
        poll_seconds: float = 1.0,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.client = client
        self.settings = settings
        self.workers = max(1, workers)
        self.lease_seconds = lease_seconds
        self.retry = retry or RetryPolicy()
        self.audit_fn = audit_fn
        self.poll_seconds = poll_seconds
        self.on_done = on_done
        self.stop_event = threading.Event()
        self._ids = itertools.count(1)
        self._prefix = worker_prefix()
        self._lock = threading.Lock()
        self._in_flight: dict[int, str] = {}  # audit id -> worker id
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []

    # A worker id is host:pid:n so a restarted daemon can tell its dead predecessor's.
    def _worker_id(self) -> str:
        return f"{self._prefix}:{next(self._ids)}"

    @property
    def in_flight(self) -> dict[int, str]:
        with self._lock:
            return dict(self._in_flight)

    def _loop(self, *, until_empty: bool) -> None:
        worker_id = self._worker_id()

        def claimed(audit_id: int) -> None:
            with self._lock:
                self._in_flight[audit_id] = worker_id

        def released(audit_id: int) -> None:
            with self._lock:
                self._in_flight.pop(audit_id, None)

        while not self.stop_event.is_set():
            try:
                did = run_one(self.session_factory, self.client, self.settings,
                              worker_id=worker_id, lease_seconds=self.lease_seconds,
                              retry=self.retry, audit_fn=self.audit_fn,
                              on_claim=claimed, on_release=released)
            except Exception as exc:  # the DB went away: back off, keep the worker
                log.warning("worker error", worker=worker_id, error=str(exc))
                did = False
            if did:
                if self.on_done is not None:
                    self.on_done()
                continue
            wait = self.poll_seconds
            if until_empty:
                with self.session_factory() as session:
                    # Leases that expired while draining (a worker that died or could not
                    # record its failure) go back to the queue here: drain always ends.
                    queue.requeue_expired(session)
                with self.session_factory() as session:
                    if pending_count(session) == 0:
                        return
                    due = next_due_at(session)
                if due is not None:
                    wait = min(wait, max(0.01, (due - utcnow()).total_seconds()))
            self.stop_event.wait(wait)

    def drain(self) -> None:
        """Run until no audit is queued or running (retries included), then return."""
        import auditor.orchestrator  # noqa: F401  (and the detector modules, before the threads)
        from auditor.preload import preload

        preload()  # heavy, lazily-bound imports before the threads race for them
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="audit") as pool:
            futures = [pool.submit(self._loop, until_empty=True) for _ in range(self.workers)]
            for f in futures:
                f.result()

    def start(self) -> None:
        """Run in the background until ``stop``."""
        import auditor.orchestrator  # noqa: F401  (and the detector modules, before the threads)
        from auditor.preload import preload

        preload()
        self._executor = ThreadPoolExecutor(max_workers=self.workers,
                                            thread_name_prefix="audit")
        self._futures = [self._executor.submit(self._loop, until_empty=False)
                         for _ in range(self.workers)]

    def stop(self, *, grace_seconds: float) -> bool:
        """Stop claiming; wait up to ``grace_seconds`` for running audits. Audits still
        running then are given back to the queue (the caller should exit). Returns True
        if every audit finished in time."""
        self.stop_event.set()
        deadline = time.monotonic() + grace_seconds
        for f in self._futures:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # A timeout or a worker error: the in-flight audits are handled below.
            with contextlib.suppress(Exception):
                f.result(timeout=remaining)
        leftover = self.in_flight
        for audit_id, worker_id in leftover.items():
            try:
                with self.session_factory() as session:
                    released = release_audit(session, audit_id=audit_id, worker_id=worker_id)
                log.warning("audit interrupted by shutdown", audit=audit_id,
                            requeued=released)
            except Exception as exc:
                # The lease expires and requeue_expired puts it back anyway.
                log.warning("could not release audit", audit=audit_id, error=str(exc))
        if self._executor is not None:
            self._executor.shutdown(wait=not leftover, cancel_futures=True)
        return not leftover

