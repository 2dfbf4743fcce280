"""huggingface_hub / httpx / OS exceptions mapped to ``auditor.errors`` types, and which of
them are worth a retry (429 with its Retry-After, 5xx, cut connections)."""

from __future__ import annotations

from typing import Any

import httpx

from auditor.errors import (
    AuditorError,
    EntryNotFound,
    GatedRepo,
    HubError,
    RateLimited,
    RepoNotFound,
    RevisionNotFound,
    TransientHubError,
)


def _retry_after(response: Any) -> float | None:
    try:
        value = response.headers.get("Retry-After")
        return float(value) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def map_hub_error(exc: BaseException, *, what: str = "Hub request") -> AuditorError:
    """The ``auditor.errors`` equivalent of a huggingface_hub / httpx / OS exception."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, AuditorError):
        return exc
    # hf_hub_download wraps the HEAD failure in LocalEntryNotFoundError: the cause says more.
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for err in chain:
        msg = f"{what}: {type(err).__name__}"
        if isinstance(err, hf_errors.GatedRepoError):
            return GatedRepo(f"{what}: gated repo, access needs accepted terms or a token")
        if isinstance(err, hf_errors.RepositoryNotFoundError):
            return RepoNotFound(f"{what}: repository not found (or private)")
        if isinstance(err, hf_errors.RevisionNotFoundError):
            return RevisionNotFound(f"{what}: revision not found")
        if isinstance(err, hf_errors.RemoteEntryNotFoundError):
            return EntryNotFound(f"{what}: file not found in the repository")
        if isinstance(err, hf_errors.HfHubHTTPError | httpx.HTTPStatusError):
            response = getattr(err, "response", None)
            status = getattr(response, "status_code", None)
            if status == 429:
                retry = _retry_after(response)
                return RateLimited(f"{what}: rate limited (429)", retry_after=retry)
            if status is not None and (status >= 500 or status == 408):
                return TransientHubError(f"{what}: server error {status}")
            if status is not None:
                return HubError(f"{what}: HTTP {status}")
        if isinstance(err, httpx2.TransportError | httpx.TransportError | TimeoutError
                      | ConnectionError):
            return TransientHubError(f"{msg} (connection failed or cut)")
        if isinstance(err, OSError) and "Consistency check failed" in str(err):
            return TransientHubError(f"{what}: incomplete download (connection cut)")
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        return TransientHubError(f"{what}: Hub unreachable and file not cached")
    return HubError(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")


def is_retryable(err: AuditorError) -> bool:
    return isinstance(err, RateLimited | TransientHubError)
