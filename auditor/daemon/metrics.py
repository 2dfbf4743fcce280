"""Prometheus metrics of the daemon (served when ``Settings.metrics_port`` is set)."""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

AUDITS = Counter("auditor_audits_total", "Audits finished by outcome "
                 "(done, failed, skipped, retried).", ["outcome"])
QUEUE_DEPTH = Gauge("auditor_queue_depth", "Audits by status.", ["status"])
CRAWL_SUCCESS = Gauge("auditor_crawl_last_success_timestamp_seconds",
                      "Unix time of the last successful crawl of a base.", ["base"])
CRAWL_FAILURES = Counter("auditor_crawl_failures_total", "Failed crawls of a base.", ["base"])

_started_lock = threading.Lock()
_started: set[int] = set()


def serve(port: int, *, host: str = "127.0.0.1") -> None:
    """Start the /metrics endpoint once per port (idempotent: scheduler restarts reuse it)."""
    with _started_lock:
        if port in _started:
            return
        start_http_server(port, addr=host)
        _started.add(port)
    log.info("metrics endpoint host=%s port=%d", host, port)


def update_queue(depth: object) -> None:
    """Copy a ``auditor.store.queries.QueueDepth`` into the gauge."""
    for status in ("queued", "running", "done", "failed", "skipped"):
        QUEUE_DEPTH.labels(status=status).set(getattr(depth, status, 0))
