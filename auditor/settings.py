"""One settings object for the whole product (``AUDITOR_*`` environment variables)."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration read from ``AUDITOR_*`` environment variables.

    ``database_url`` defaults to a SQLite file in ``data_dir``; alembic reads the same value.
    """

    model_config = SettingsConfigDict(env_prefix="AUDITOR_", frozen=True, extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path.home() / ".local" / "share" / "auditor")
    database_url: str | None = None
    hub_endpoint: str = "https://huggingface.co"
    # Never logged, never stored: SecretStr keeps it out of reprs.
    hub_token: SecretStr | None = None
    cache_dir: Path | None = None
    disk_budget_bytes: int = 20 * 1024**3
    workers: int = 2
    crawl_interval_seconds: int = 600
    metrics_port: int | None = None
    probe_file: Path | None = None
    barrier_points: int = 11
    # Behavioural checks: "auto" runs them on CUDA when present, else on the CPU.
    device: str = "auto"
    # Compute budget of one audit's forward passes (FLOPs, about 2 x params per token); the
    # probe set shrinks to fit it, so a 1B model on 2 CPU cores stays within minutes while
    # tiny models keep their full probe sets.
    cpu_probe_flops: float = 4e12
    gpu_probe_flops: float = 2e15
    # Behavioural checks (barrier curves, equivalence) only for the top-K related candidates.
    behaviour_top_k: int = 3
    # Host memory the behavioural model may take in float32 before computing in the
    # weights' own dtype instead (None: always float32 on the CPU).
    host_memory_bytes: int | None = 8 * 1024**3
    # Every model read leaves its fingerprint, keyed by content, in the database.
    fingerprint_cache: bool = True
    # On-demand audits also compare against the cached homologues of the same base.
    compare_stored: bool = True
    max_stored_homologues: int = 500
    # Directory of rules/*.yaml; default: the rules/ folder next to the package.
    rules_dir: Path | None = None

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'auditor.db'}"

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or (self.data_dir / "hf-cache")

    def token_value(self) -> str | None:
        return self.hub_token.get_secret_value() if self.hub_token else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def analysis_config_hash(settings: Settings) -> str:
    """A short hash of the settings that change an audit's result.

    Part of the audit's unique key: changing them queues the revisions again (the
    history is kept) while unrelated settings (workers, ports, token) do not.
    """
    rules_digest = ""
    if settings.rules_dir is not None and settings.rules_dir.is_dir():
        digest = hashlib.sha256()
        for path in sorted(settings.rules_dir.glob("*.y*ml")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        rules_digest = digest.hexdigest()
    probe_digest = ""
    if settings.probe_file is not None and settings.probe_file.is_file():
        probe_digest = hashlib.sha256(settings.probe_file.read_bytes()).hexdigest()
    payload = {
        "barrier_points": settings.barrier_points,
        "probe_file": probe_digest,
        "rules": rules_digest,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
