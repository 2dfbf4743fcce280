"""Helpers of the Celery tests and benchmark: brokers, worker and scheduler processes.

Every run uses its own queue names (a random prefix) on the shared RabbitMQ, so parallel
runs never take each other's messages; the queues are deleted afterwards. The broker
timeout test starts a private RabbitMQ node (its own port, data dir and a short
``consumer_timeout``), because RabbitMQ 3.10 only has that timeout server-wide.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def queue_prefix() -> str:
    return f"auditor-test-{uuid.uuid4().hex[:10]}"


def delete_queues(broker_url: str, prefix: str) -> None:
    from kombu import Connection, Exchange, Queue

    with contextlib.suppress(Exception), Connection(broker_url, connect_timeout=3) as conn:
        for kind in ("cpu", "gpu"):
            with contextlib.suppress(Exception):
                Queue(f"{prefix}.{kind}")(conn.channel()).delete()
        with contextlib.suppress(Exception):
            Exchange(prefix)(conn.channel()).delete()


def rabbitmq_server_binary() -> str | None:
    # The Debian wrapper in /usr/sbin switches to the rabbitmq user, which cannot write
    # our temporary data dir: run the real script.
    for path in ("/usr/lib/rabbitmq/bin/rabbitmq-server", shutil.which("rabbitmq-server")):
        if path and os.access(path, os.X_OK):
            return path
    return None


@contextlib.contextmanager
def private_rabbitmq(root: Path, *, consumer_timeout_ms: int) -> Iterator[str]:
    """A throwaway RabbitMQ node whose consumer_timeout is ``consumer_timeout_ms``
    (checked every 200 ms, not once a minute); yields its AMQP URL."""
    binary = rabbitmq_server_binary()
    if binary is None:
        raise RuntimeError("rabbitmq-server is not installed")
    port, dist = free_port(), free_port()
    root.mkdir(parents=True, exist_ok=True)
    (root / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{port}\n"
        f"consumer_timeout = {consumer_timeout_ms}\nloopback_users = none\n")
    (root / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 200}]}].\n")
    (root / "plugins").write_text("[].\n")
    name = f"auditortest{uuid.uuid4().hex[:8]}@localhost"
    env = {**os.environ, "HOME": str(root), "RABBITMQ_CONF_ENV_FILE": "/dev/null",
           "RABBITMQ_NODENAME": name, "RABBITMQ_NODE_PORT": str(port),
           "RABBITMQ_DIST_PORT": str(dist), "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
           "RABBITMQ_LOG_BASE": str(root / "log"),
           "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
           "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
           "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "plugins"),
           "RABBITMQ_PID_FILE": str(root / "pid"), "ERL_EPMD_ADDRESS": "127.0.0.1"}
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([binary], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port, timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("private RabbitMQ did not start: "
                                   + (root / "server.log").read_text()[-2000:])
            time.sleep(0.2)
        yield f"amqp://guest:guest@127.0.0.1:{port}//"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def worker_env(*, database_url: str, hub_endpoint: str, broker_url: str, prefix: str,
               data_dir: Path, calls: Path, extra: dict[str, str] | None = None
               ) -> dict[str, str]:
    env = {**os.environ, "AUDITOR_DATABASE_URL": database_url,
           "AUDITOR_HUB_ENDPOINT": hub_endpoint, "AUDITOR_BROKER_URL": broker_url,
           "AUDITOR_QUEUE_PREFIX": prefix, "AUDITOR_DATA_DIR": str(data_dir),
           "AUDITOR_WORKER_HEARTBEAT_SECONDS": "1", "CELERY_TEST_CALLS": str(calls),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    env.pop("AUDITOR_HUB_TOKEN", None)
    env.update(extra or {})
    return env


def start_worker(env: dict[str, str], *, name: str, queues: str, log_path: Path,
                 concurrency: int = 1, app: str = "tests.celery_test_app",
                 cache_dir: Path | None = None) -> subprocess.Popen[bytes]:
    """A real ``celery worker`` process (prefork pool) in its own process group, so a
    test can kill the whole worker (main and pool processes) like a lost machine."""
    if cache_dir is not None:
        # One download cache per worker: nothing shared through one worker's disk.
        env = {**env, "AUDITOR_CACHE_DIR": str(cache_dir)}
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", app, "worker", "--queues", queues,
         "--concurrency", str(concurrency), "--pool", "prefork", "--loglevel", "INFO",
         "--hostname", f"{name}@%h", "--without-gossip", "--without-mingle"],
        env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_scheduler(env: dict[str, str], *, log_path: Path, extra: list[str] | None = None
                    ) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "auditor.cli", "daemon", "--backend", "celery",
         "--interval", "3600", "--log-level", "info", *(extra or [])],
        env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM,
         timeout: float = 30) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Pool processes left behind by a killed main process.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return int(proc.returncode)


def read_calls(path: Path) -> list[tuple[str, int, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((parts[0], int(parts[1]), parts[2]))
    return out


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2,
             what: str = "", logs: list[Path] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                      for p in (logs or []) if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")
