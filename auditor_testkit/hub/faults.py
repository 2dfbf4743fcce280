"""Injected failures of the local Hub (429 with Retry-After, 5xx, bodies cut mid-way).

Tests and benchmarks use them to prove the client's retries and the daemon's requeues.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from starlette.concurrency import iterate_in_threadpool
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send


def error_response(status: int, code: str | None, message: str,
           headers: dict[str, str] | None = None) -> Response:
    hdrs = dict(headers or {})
    if code:
        hdrs["X-Error-Code"] = code
    hdrs["X-Error-Message"] = message
    return JSONResponse({"error": message}, status_code=status, headers=hdrs)



@dataclass(frozen=True)
class FaultConfig:
    """Injected failures. ``paths`` names the affected endpoints: ``resolve-get``,
    ``resolve-head``, ``api`` (models/tree/paths-info). ``max_faults`` caps how many are
    injected in total (None: unlimited), which makes "fail once, then succeed" tests exact."""

    rate_429: float = 0.0
    retry_after: float = 1.0
    rate_5xx: float = 0.0
    rate_cut: float = 0.0
    seed: int = 0
    paths: frozenset[str] = frozenset({"resolve-get"})
    max_faults: int | None = None


class FaultInjector:
    def __init__(self, config: FaultConfig | None) -> None:
        self.config = config
        self._rng = random.Random(config.seed if config else 0)
        self._lock = threading.Lock()
        self.injected = 0

    def pick(self, endpoint: str) -> str | None:
        """'429', '5xx', 'cut' or None for this request."""
        cfg = self.config
        if cfg is None or endpoint not in cfg.paths:
            return None
        with self._lock:
            if cfg.max_faults is not None and self.injected >= cfg.max_faults:
                return None
            roll = self._rng.random()
            kind = None
            if roll < cfg.rate_429:
                kind = "429"
            elif roll < cfg.rate_429 + cfg.rate_5xx:
                kind = "5xx"
            elif roll < cfg.rate_429 + cfg.rate_5xx + cfg.rate_cut:
                kind = "cut" if endpoint == "resolve-get" else "5xx"
            if kind is not None:
                self.injected += 1
            return kind

    def response(self, kind: str) -> Response:
        assert self.config is not None
        if kind == "429":
            retry = max(0, round(self.config.retry_after))
            return error_response(429, None, "rate limited (injected)", {"Retry-After": str(retry)})
        status = 503 if self._rng.random() < 0.5 else 500
        return error_response(status, None, "server error (injected)")


class CutResponse(Response):
    """Sends headers with the full Content-Length, part of the body, then drops the connection."""

    def __init__(self, chunks: Iterator[bytes], total: int, send_bytes: int,
                 headers: dict[str, str], status_code: int) -> None:
        super().__init__(status_code=status_code, headers=headers)
        self._chunks = chunks
        self._send_bytes = send_bytes
        self.headers["content-length"] = str(total)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        sent = 0
        async for chunk in iterate_in_threadpool(self._chunks):
            part = chunk[: self._send_bytes - sent]
            if part:
                await send({"type": "http.response.body", "body": part, "more_body": True})
                sent += len(part)
            if sent >= self._send_bytes:
                break
        await asyncio.sleep(0.01)  # let the partial body reach the socket before the cut
        raise ConnectionAbortedError("connection cut (injected fault)")
