"""Random access to one file of a resolved repo: HTTP Range reads or a local file.

Both satisfy ``auditor.weights.base.ByteSource``. A server that ignores ``Range`` answers
200 with the whole body (some mirrors do); using that body as if it were the requested
range silently gives wrong data. ``RangeFile`` detects the 200, streams the body from the
start, keeps only the requested bytes and closes the connection right after them, so
reading a header never downloads the whole file. Streaming past ``max_stream_bytes`` (a
read deep into a large file) raises ``RangeNotSupported`` instead. A 206 whose
Content-Range is not exactly the requested one raises ``RangeNotSupported`` too.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from auditor.errors import (
    AuditorError,
    EntryNotFound,
    HubError,
    RangeNotSupported,
    RateLimited,
    TransientHubError,
)

if TYPE_CHECKING:
    from auditor.hub.client import HubClient, ResolvedRepo

_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
# Read size when streaming a 200 answer: bounds how far past the needed bytes we read.
STREAM_CHUNK = 16 << 10


def stream_chunk(stop: int) -> int:
    """Read size for streaming up to byte ``stop``: 1/16 of it, within 256 B-16 KiB."""
    return max(256, min(STREAM_CHUNK, stop // 16))


class LocalRangeFile:
    """A ``ByteSource`` over a local file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh = self.path.open("rb")
        self._size = self.path.stat().st_size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        _check_bounds(offset, length, self._size)
        self._fh.seek(offset)
        data = self._fh.read(length)
        if len(data) != length:
            raise EntryNotFound(f"{self.path}: short read at {offset} ({len(data)}/{length})")
        return data

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> LocalRangeFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RangeFile:
    """A ``ByteSource`` reading byte ranges of a Hub file pinned to a commit."""

    def __init__(
        self,
        url: str,
        *,
        size: int,
        headers: dict[str, str] | None = None,
        max_retries: int = 3,
        backoff_seconds: float = 0.5,
        max_wait_seconds: float = 30.0,
        timeout: float = 30.0,
        max_stream_bytes: int = 32 << 20,
    ) -> None:
        self.url = url
        # How far into the file a read may stream when the server ignores Range: enough
        # for any safetensors header (25 MB limit), never a whole multi-GB shard.
        self.max_stream_bytes = max_stream_bytes
        self.range_ignored = False
        self.bytes_transferred = 0
        self._prefix = b""  # the start of the file, kept from a 200 answer
        self._size = size
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.max_wait_seconds = max_wait_seconds
        # httpx drops Authorization on cross-origin redirects (CDN), so following is safe.
        self._http = httpx.Client(headers=headers or {}, timeout=timeout, follow_redirects=True)
        self.requests = 0

    def __repr__(self) -> str:  # no headers: they hold the token
        return f"RangeFile({self.url!r}, size={self._size})"

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        _check_bounds(offset, length, self._size)
        if length == 0:
            return b""
        if offset + length <= len(self._prefix):
            return self._prefix[offset: offset + length]
        attempt = 0
        while True:
            try:
                return self._read_once(offset, length)
            except (RateLimited, TransientHubError) as err:
                if attempt >= self.max_retries:
                    raise
                wait = self.backoff_seconds * (2**attempt)
                if isinstance(err, RateLimited) and err.retry_after is not None:
                    wait = err.retry_after
                time.sleep(min(wait, self.max_wait_seconds))
                attempt += 1

    def _read_once(self, offset: int, length: int) -> bytes:
        end = offset + length - 1
        if self.range_ignored and offset + length > self.max_stream_bytes:
            raise RangeNotSupported(
                f"{self.url}: the server ignores Range and bytes {offset}-{end} lie beyond "
                f"the {self.max_stream_bytes} bytes this reader streams"
            )
        self.requests += 1
        try:
            with self._http.stream("GET", self.url, headers={"Range": f"bytes={offset}-{end}"}
                                   ) as resp:
                if resp.status_code == 200:
                    return self._from_full_body(resp, offset, length)
                if resp.status_code != 206:
                    _raise_for_status(resp, self.url)
                    raise RangeNotSupported(
                        f"{self.url}: server answered {resp.status_code} to a Range request"
                    )
                match = _CONTENT_RANGE_RE.match(resp.headers.get("content-range", "").strip())
                if not match or (int(match.group(1)), int(match.group(2))) != (offset, end):
                    raise RangeNotSupported(
                        f"{self.url}: Content-Range {resp.headers.get('content-range')!r} does "
                        f"not match the requested bytes {offset}-{end}"
                    )
                data = bytearray()
                for chunk in resp.iter_bytes():
                    data += chunk
                    self.bytes_transferred += len(chunk)
                    if len(data) > length:
                        raise RangeNotSupported(f"{self.url}: more bytes than requested")
        except httpx.TransportError as exc:
            raise TransientHubError(f"{self.url}: connection failed or cut ({type(exc).__name__})"
                                    ) from exc
        if len(data) != length:
            raise TransientHubError(f"{self.url}: short body {len(data)}/{length} (cut)")
        return bytes(data)

    def _from_full_body(self, resp: httpx.Response, offset: int, length: int) -> bytes:
        """The requested bytes out of a 200 answer: stream from the start, stop right after
        them, and keep what came (later reads inside it cost nothing)."""
        self.range_ignored = True
        if offset + length > self.max_stream_bytes:
            raise RangeNotSupported(
                f"{self.url}: the server ignores Range; reading bytes at {offset} would stream "
                f"more than {self.max_stream_bytes} bytes"
            )
        declared = resp.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) != self._size:
            raise RangeNotSupported(f"{self.url}: a 200 body of {declared} bytes is not the "
                                    f"whole file ({self._size} bytes)")
        stop = offset + length
        # One stream fetches the whole affordable prefix (later reads in it are free), and
        # stops one read short of the limit so the transfer itself stays within it.
        size = stream_chunk(self.max_stream_bytes)
        target = max(stop, min(self._size, self.max_stream_bytes - size))
        prefix = bytearray()
        for chunk in resp.iter_bytes(chunk_size=size):
            self.bytes_transferred += len(chunk)
            prefix += chunk
            if len(prefix) >= target:
                break  # leaving the with-block closes the connection: the rest never comes
        if len(prefix) > len(self._prefix):
            self._prefix = bytes(prefix[: self.max_stream_bytes])
        if len(prefix) < stop:
            raise TransientHubError(f"{self.url}: short body {len(prefix)}/{stop} (cut)")
        return bytes(prefix[offset:stop])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RangeFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_bounds(offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise EntryNotFound(f"read of {length} bytes at {offset} is outside the file ({size})")


def _raise_for_status(resp: httpx.Response, url: str) -> None:
    """Map an error answer to the auditor's hub errors (success codes return)."""
    if resp.status_code < 400:
        return
    from auditor.errors import GatedRepo, RepoNotFound, RevisionNotFound

    code = resp.headers.get("x-error-code", "")
    by_code: dict[str, type[AuditorError]] = {
        "GatedRepo": GatedRepo, "RepoNotFound": RepoNotFound,
        "RevisionNotFound": RevisionNotFound, "EntryNotFound": EntryNotFound,
    }
    if code in by_code:
        raise by_code[code](f"{url}: {code}")
    if resp.status_code == 429:
        try:
            retry = float(resp.headers.get("retry-after", ""))
        except ValueError:
            retry = None
        raise RateLimited(f"{url}: rate limited", retry_after=retry)
    if resp.status_code >= 500 or resp.status_code == 408:
        raise TransientHubError(f"{url}: server error {resp.status_code}")
    raise HubError(f"{url}: HTTP {resp.status_code}")


def open_range(
    client: HubClient, resolved: ResolvedRepo, filename: str, *,
    max_stream_bytes: int | None = None,
) -> RangeFile | LocalRangeFile:
    """A ``ByteSource`` for ``filename`` at ``resolved.revision`` without downloading it.

    ``max_stream_bytes`` bounds how far a read may stream when the server ignores Range."""
    if resolved.local_dir is not None:
        return LocalRangeFile(client.local_path(resolved, filename))
    if filename not in resolved.files:
        raise EntryNotFound(f"{resolved.repo_id}: no file {filename!r}")
    return RangeFile(
        client.file_url(resolved, filename),
        size=resolved.files[filename],
        headers=client.auth_headers(),
        max_retries=client.max_retries,
        backoff_seconds=client.backoff_seconds,
        max_wait_seconds=client.max_wait_seconds,
        **({} if max_stream_bytes is None else {"max_stream_bytes": max_stream_bytes}),
    )
