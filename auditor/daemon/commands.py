"""``auditor watch add|list|remove``, ``auditor crawl --once``, ``auditor daemon`` and
``auditor status``."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from auditor.daemon.scheduler import Daemon
    from auditor.settings import Settings


def _settings() -> Settings:
    from auditor.settings import Settings

    # Not the cached get_settings(): tests and wrappers change the environment.
    return Settings()


def _database_url(settings: Settings) -> str:
    from auditor.store.db import normalize_url

    if not settings.database_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return normalize_url(settings.resolved_database_url)


def _session():  # type: ignore[no-untyped-def]
    from auditor.store.db import migrated_session

    return migrated_session(_database_url(_settings()))


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at write time, not at configuration time: test runners
    and wrappers swap (and close) the stream they captured."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(*, json_logs: bool, level: str) -> None:
    """Structured logs on stderr (key=value or JSON) for the daemon and its workers."""
    import structlog

    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=numeric, stream=_CurrentStderr(),  # type: ignore[arg-type]
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
    renderer: Any = (structlog.processors.JSONRenderer() if json_logs
                     else structlog.processors.KeyValueRenderer(
                         key_order=["timestamp", "level", "event"], drop_missing=True))
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def _make_daemon(settings: Settings, *, workers: int | None, interval: float | None,
                 lease_seconds: float, grace_seconds: float, retry_backoff: float,
                 max_attempts: int, backend: str = "threads") -> Daemon:
    from auditor.daemon.scheduler import Daemon
    from auditor.daemon.worker import RetryPolicy
    from auditor.hub.client import HubClient
    from auditor.store.db import upgrade_database

    url = _database_url(settings)
    upgrade_database(url)
    cls: type[Daemon] = Daemon
    if backend == "celery":
        from auditor.daemon.celery_scheduler import CeleryDaemon

        cls = CeleryDaemon
    elif backend != "threads":
        typer.echo(f"unknown backend {backend!r} (threads or celery)", err=True)
        raise typer.Exit(2)
    return cls(
        settings=settings, database_url=url, client=HubClient.from_settings(settings),
        workers=workers or settings.workers,
        interval_seconds=interval or settings.crawl_interval_seconds,
        lease_seconds=lease_seconds, grace_seconds=grace_seconds,
        retry=RetryPolicy(max_attempts=max_attempts, backoff_seconds=retry_backoff),
    )


LeaseOpt = Annotated[float, typer.Option(help="Seconds an audit's lease lasts (renewed while "
                                         "it runs; a killed worker's audit is re-queued after).")]
GraceOpt = Annotated[float, typer.Option(help="On SIGTERM/SIGINT, seconds running audits get "
                                         "to finish before they are re-queued.")]
BackoffOpt = Annotated[float, typer.Option(help="First retry delay of a transient failure "
                                           "(doubles per attempt; Retry-After honoured).")]
AttemptsOpt = Annotated[int, typer.Option(help="Attempts before an audit is marked failed.")]
WorkersOpt = Annotated[int | None, typer.Option(help="Parallel audits (default AUDITOR_WORKERS).")]


def register(app: typer.Typer) -> None:
    watch_app = typer.Typer(help="Base models whose derivatives are crawled.",
                            no_args_is_help=True)

    @watch_app.command("add")
    def watch_add(
        base: Annotated[str, typer.Argument(help="Base model repo id, e.g. org/name.")],
        note: Annotated[str | None, typer.Option(help="Why it is watched.")] = None,
        check: Annotated[bool, typer.Option(
            "--check/--no-check",
            help="Check on the Hub that BASE exists and is a model (--no-check: offline).")
        ] = True,
    ) -> None:
        """Watch BASE: its derivatives are crawled and audited."""
        from auditor.errors import RepoNotFound
        from auditor.hub.card import is_repo_id
        from auditor.store import policy

        if not is_repo_id(base):
            raise RepoNotFound(f"{base!r} is not a valid repo id (expected ORG/NAME)")
        if check:
            from auditor.errors import AuditorError
            from auditor.exitcodes import ExitCode

            try:
                _check_base(base)
            except AuditorError as exc:
                typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
                raise typer.Exit(ExitCode.ERROR) from None
        with _session() as session:
            policy.watch_add(session, repo_id=base, note=note)
        typer.echo(f"watching {base}")

    @watch_app.command("list")
    def watch_list() -> None:
        """List the watched bases."""
        from auditor.store import policy

        with _session() as session:
            rows = policy.watch_list(session)
            for row in rows:
                note = f"  # {row.note}" if row.note else ""
                typer.echo(f"{row.repo_id}{note}")

    @watch_app.command("remove")
    def watch_remove(base: Annotated[str, typer.Argument(help="Base model repo id.")]) -> None:
        """Stop watching BASE (its audits stay in the store)."""
        from auditor.store import policy

        with _session() as session:
            removed = policy.watch_remove(session, repo_id=base)
        if not removed:
            typer.echo(f"{base} was not watched", err=True)
            raise typer.Exit(1)
        typer.echo(f"no longer watching {base}")

    app.add_typer(watch_app, name="watch")

    @app.command("crawl")
    def crawl(
        once: Annotated[bool, typer.Option("--once", help="Crawl every watched base once, "
                                           "run the queued audits, exit (for cron).")] = False,
        workers: WorkersOpt = None,
        lease_seconds: LeaseOpt = 300.0,
        retry_backoff: BackoffOpt = 30.0,
        max_attempts: AttemptsOpt = 5,
    ) -> None:
        """Crawl the watched bases and audit what is new."""
        if not once:
            typer.echo("use `auditor crawl --once` (or `auditor daemon` to keep running)",
                       err=True)
            raise typer.Exit(2)
        configure_logging(json_logs=False, level="warning")
        settings = _settings()
        daemon = _make_daemon(settings, workers=workers, interval=None,
                              lease_seconds=lease_seconds, grace_seconds=0,
                              retry_backoff=retry_backoff, max_attempts=max_attempts)
        from auditor.daemon.worker import run_counts

        before = run_counts()
        try:
            results = _crawl_once(daemon, progress=sys.stderr.isatty())
        finally:
            daemon.close()
        failed = [r for r in results if not r.ok]
        for r in results:
            state = "ok" if r.ok else f"FAILED: {r.error}"
            typer.echo(f"{r.base_repo_id}: listed {r.listed}, queued {len(r.queued)}, "
                       f"skipped {len(r.skipped)} ({state})")
        runs = {k: v - before[k] for k, v in run_counts().items()}
        typer.echo(f"audit runs: {runs['full']} full, {runs['incremental']} incremental "
                   f"updates, {runs['behaviour']} deferred behavioural passes")
        with _session() as session:
            _print_depth(session)
        if failed:
            raise typer.Exit(1)

    @app.command("daemon")
    def daemon_cmd(
        workers: WorkersOpt = None,
        interval: Annotated[float | None, typer.Option(
            help="Seconds between crawls of a base (default AUDITOR_CRAWL_INTERVAL_SECONDS).")
        ] = None,
        once: Annotated[bool, typer.Option("--once", help="One crawl + drain, then exit.")
                        ] = False,
        lease_seconds: LeaseOpt = 300.0,
        grace_seconds: GraceOpt = 60.0,
        retry_backoff: BackoffOpt = 30.0,
        max_attempts: AttemptsOpt = 5,
        json_logs: Annotated[bool, typer.Option("--json-logs", help="JSON log lines.")] = False,
        log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
        backend: Annotated[str, typer.Option(
            help="threads: audits run in this process (default, embedded SQLite). celery: "
                 "this process only crawls and publishes; `auditor worker` runs the audits.")
        ] = "threads",
    ) -> None:
        """Crawl the watched bases on a schedule and audit new revisions until stopped."""
        configure_logging(json_logs=json_logs, level=log_level)
        settings = _settings()
        daemon = _make_daemon(settings, workers=workers, interval=interval,
                              lease_seconds=lease_seconds, grace_seconds=grace_seconds,
                              retry_backoff=retry_backoff, max_attempts=max_attempts,
                              backend=backend)
        if once:
            try:
                results = daemon.run_once()
            finally:
                daemon.close()
            if any(not r.ok for r in results):
                raise typer.Exit(1)
            return
        clean = daemon.run_forever()
        daemon.close()
        if not clean:
            # Worker threads still hold interrupted audits (already re-queued): do not
            # wait for them, and flush what we logged first.
            logging.shutdown()
            sys.stderr.flush()
            os._exit(0)

    @app.command("status")
    def status(
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")
                           ] = False,
    ) -> None:
        """Health: last crawl of each base, queue depth, recent failures."""
        from auditor.store import queries

        with _session() as session:
            data = _status_data(session)
            if as_json:
                typer.echo(json.dumps(data, indent=2))
                return
            from rich.console import Console
            from rich.table import Table

            console = Console()
            crawls = Table("base", "last success", "last error", title="crawls")
            for c in data["crawls"]:
                crawls.add_row(c["base"], c["last_success_at"] or "never",
                               (c["last_error"] or "")[:80])
            console.print(crawls)
            _print_depth(session)
            if data["workers"]:
                table = Table("worker", "queues", "device", "last seen", "audit",
                              "done", "failed", "audits/min", title="workers (last 5 min)")
                for w in data["workers"]:
                    table.add_row(w["worker_id"], ",".join(w["queues"]), w["device"],
                                  w["last_seen_at"] + (" (stopped)" if w["stopped"] else ""),
                                  str(w["current_audit_id"] or "-"), str(w["audits_done"]),
                                  str(w["audits_failed"]), str(w["audits_per_minute"]))
                console.print(table)
            failures = queries.recent_failures(session, limit=20)
            if failures:
                table = Table("audit", "status", "attempts", "error", title="failures")
                for a in failures:
                    table.add_row(str(a.id), a.status, str(a.attempts), (a.error or "")[:100])
                console.print(table)


def _check_base(base: str) -> None:
    """BASE must exist on the Hub as a model with weights or a config (not a dataset)."""
    from auditor.errors import RepoNotFound
    from auditor.hub.client import HubClient
    from auditor.weights.inventory import classify_files

    settings = _settings()
    client = HubClient.from_settings(settings)
    try:
        resolved = client.resolve(base)
    except RepoNotFound as exc:
        raise RepoNotFound(f"{base}: no such model on {client.endpoint} ({exc}); check the "
                           "id (datasets and spaces cannot be watched) or the endpoint "
                           "(HF_ENDPOINT / AUDITOR_HUB_ENDPOINT)") from exc
    inv = classify_files(resolved.files)
    if not (inv.has_weights or "config.json" in resolved.files):
        raise RepoNotFound(f"{base}: found on {client.endpoint} but it holds no model weights "
                           "or config.json; is it a model?")


def _status_data(session: Session) -> dict[str, Any]:
    from dataclasses import asdict

    from auditor.store import catalog, policy, queries

    watched = [w.repo_id for w in policy.watch_list(session)]
    cursors = {c.base_repo_id: c for c in catalog.last_crawls(session)}
    crawls = []
    for base in sorted(set(watched) | set(cursors)):
        c = cursors.get(base)
        crawls.append({
            "base": base,
            "watched": base in watched,
            "last_success_at": c.last_success_at.isoformat() if c and c.last_success_at
            else None,
            "last_error": c.last_error if c else None,
            "last_error_at": c.last_error_at.isoformat() if c and c.last_error_at else None,
        })
    failures = [{"audit": a.id, "status": a.status, "attempts": a.attempts, "error": a.error}
                for a in queries.recent_failures(session, limit=20)]
    from auditor.daemon.celery_store import workers_seen

    workers = [{**asdict(w), "last_seen_at": w.last_seen_at.isoformat()}
               for w in workers_seen(session, minutes=5.0)]
    return {"crawls": crawls, "queue": asdict(queries.queue_depth(session)),
            "failures": failures, "workers": workers}


def _print_depth(session: Session) -> None:
    from auditor.store import queries

    d = queries.queue_depth(session)
    typer.echo(f"queue: {d.queued} queued, {d.running} running, {d.done} done, "
               f"{d.failed} failed, {d.skipped} skipped")


def _crawl_once(daemon: Daemon, *, progress: bool) -> list[Any]:
    """``Daemon.run_once`` with rich progress bars on a terminal."""
    if not progress:
        return daemon.run_once()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from auditor.daemon.progress import AuditCounter, AuditTick, tick_line

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[item]}"), transient=False) as bars:
        crawl_task = bars.add_task("crawl", total=None, item="")
        audit_task: list[Any] = []

        def on_listed(base: str, repo_id: str) -> None:
            bars.update(crawl_task, advance=1, item=f"{base} <- {repo_id}")

        def on_tick(tick: AuditTick) -> None:
            if not audit_task:
                audit_task.append(bars.add_task("audits", total=tick.total, item=""))
            # The total is re-read each time: re-queued merges and new finds grow it.
            bars.update(audit_task[0], completed=tick.done, total=tick.total,
                        item=tick_line(tick))

        on_done = AuditCounter(daemon.session_factory, on_tick)
        daemon.pool.on_done = on_done
        return daemon.run_once(progress=on_listed)
