"""The product's Celery app, for ``celery -A tests.celery_test_app worker`` in tests.

The orchestrator is wrapped (the worker looks it up at call time, as for the in-process
pool) to log every audit start and end with the pool process id, and to make chosen
audits slow (``CELERY_TEST_DELAY`` seconds for the repos in ``CELERY_TEST_SLOW``, ``*``
for all), so a test can kill a worker mid-audit or outlast the broker's timeout.
"""

from __future__ import annotations

import os
import time
from typing import Any

import auditor.orchestrator as orch
from auditor.daemon.celery_app import app

__all__ = ["app"]

_real = orch.audit_revision


def _note(event: str, subject: str) -> None:
    with open(os.environ["CELERY_TEST_CALLS"], "a", encoding="utf-8") as fh:
        fh.write(f"{event} {os.getpid()} {subject} {time.time():.3f}\n")


def _audit(subject: str, **kwargs: Any) -> Any:
    _note("start", subject)
    slow = os.environ.get("CELERY_TEST_SLOW", "").split(",")
    if "*" in slow or subject in slow:
        time.sleep(float(os.environ.get("CELERY_TEST_DELAY", "0")))
    outcome = _real(subject, **kwargs)
    _note("end", subject)
    return outcome


orch.audit_revision = _audit
