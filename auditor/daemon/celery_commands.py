"""``auditor worker``: a Celery worker that runs audits published by
``auditor daemon --backend celery`` (any machine reaching the broker and the database)."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Annotated

import typer

WORKER_KINDS = ("cpu", "gpu")


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker_cmd(
        queues: Annotated[str, typer.Option(
            help="Comma-separated queues to consume: cpu (weight analysis), gpu (behavioural "
                 "checks; sets AUDITOR_DEVICE=cuda).")] = "cpu",
        concurrency: Annotated[int, typer.Option(
            help="Audit processes (each runs one audit at a time).")] = 1,
        torch_threads: Annotated[int, typer.Option(
            help="torch threads per audit process.")] = 1,
        lease_seconds: Annotated[float | None, typer.Option(
            help="Audit lease (renewed while it runs; default AUDITOR_LEASE_SECONDS).")
        ] = None,
        grace_seconds: Annotated[float | None, typer.Option(
            help="On SIGTERM, seconds a running audit gets to finish before it is given "
                 "back to the queue (default AUDITOR_WORKER_GRACE_SECONDS).")] = None,
        log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    ) -> None:
        """Run audits from the broker until SIGTERM (finish or give back the current one)."""
        from auditor.daemon.commands import configure_logging

        kinds = [k.strip() for k in queues.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in WORKER_KINDS]
        if unknown or not kinds:
            typer.echo(f"unknown queue(s) {unknown or queues!r}: use cpu and/or gpu", err=True)
            raise typer.Exit(2)
        # Read by the Settings of this process and of its pool processes (forked later).
        os.environ["OMP_NUM_THREADS"] = str(max(1, torch_threads))
        if "gpu" in kinds:
            os.environ["AUDITOR_DEVICE"] = "cuda"
        if lease_seconds is not None:
            os.environ["AUDITOR_LEASE_SECONDS"] = str(lease_seconds)
        if grace_seconds is not None:
            os.environ["AUDITOR_WORKER_GRACE_SECONDS"] = str(grace_seconds)
        configure_logging(json_logs=False, level=log_level)

        from auditor.daemon.celery_app import make_app, queue_name
        from auditor.settings import Settings

        settings = Settings()
        names = [queue_name(settings, k) for k in kinds]
        app = make_app(settings)
        node = f"auditor-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        app.worker_main(["worker", "--queues", ",".join(names),
                         "--concurrency", str(max(1, concurrency)), "--pool", "prefork",
                         "--loglevel", log_level.upper(), "--hostname", node,
                         "--without-gossip", "--without-mingle"])
