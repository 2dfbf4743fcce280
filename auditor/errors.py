"""Every error the auditor raises on purpose, in one place.

Each is an ``AuditorError`` so callers (CLI, daemon, orchestrator) can turn it into
a clear message and an exit code without catching unrelated bugs.
"""

from __future__ import annotations


class AuditorError(Exception):
    """Base class: an expected failure with a message meant for the user."""


# --- hub -------------------------------------------------------------------
class HubError(AuditorError):
    """Talking to the Hub (or a Hub-compatible server) failed."""


class RepoNotFound(HubError):
    pass


class RevisionNotFound(HubError):
    pass


class EntryNotFound(HubError):
    """The repo (at that revision) has no such file."""


class GatedRepo(HubError):
    """The repo needs accepted terms or a token we do not have: skipped, never retried."""


class RateLimited(HubError):
    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TransientHubError(HubError):
    """5xx, cut connection, timeout: worth retrying with backoff."""


# --- any file the auditor reads -----------------------------------------------
class MalformedFile(AuditorError):
    """A side file (card, config, tokenizer, index...) is not valid JSON/YAML."""


class InputLimitExceeded(MalformedFile):
    """A file breaks a size, depth, count or integer-size limit (``auditor.bounded``)."""


# --- weights ---------------------------------------------------------------
class WeightsError(AuditorError):
    """A weights file could not be read safely."""


class NoWeights(WeightsError):
    """The repo holds no weights we can analyse (maybe only pickles)."""


class MalformedSafetensors(WeightsError):
    """Truncated file, bad header, offsets out of range or overlapping, unknown dtype."""


class NonFiniteWeights(WeightsError):
    """Every tensor of a model holds NaN or infinity: nothing finite is left to compare."""

    def __init__(self, message: str, *, tensors: list[str]) -> None:
        super().__init__(message)
        self.tensors = tensors


class ShapeMismatch(WeightsError):
    pass


class UnsupportedAdapter(WeightsError):
    """An adapter whose delta cannot be reconstructed exactly (e.g. DoRA)."""


class RangeNotSupported(WeightsError):
    """The server ignored a Range request; we refuse to use the bytes."""


# --- analysis / config / rules / store ---------------------------------------
class AnalysisError(AuditorError):
    pass


class MissingBase(AnalysisError):
    """No base model given and none declared in the model card."""


class RuleError(AuditorError):
    """A rule file is invalid; the message names the file and the reason."""


class StoreError(AuditorError):
    pass
