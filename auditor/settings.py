"""One settings object for the whole product (``AUDITOR_*`` environment variables).

Hugging Face conventions are honoured so the tool fits a machine already set up for the
Hub: ``HF_ENDPOINT``, ``HF_TOKEN`` or the cached ``hf auth login`` token
(``huggingface_hub.get_token``), and the standard Hub cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``) so models already downloaded are not downloaded again. An ``AUDITOR_*``
variable (or an explicit argument) always wins; an explicit ``hub_token=None`` means "no
token", never a fallback. The token stays a SecretStr: never logged, never stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_ENDPOINT = "https://huggingface.co"


def hf_hub_cache() -> Path:
    """The standard Hub cache, as huggingface_hub resolves it (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return _hf_home() / "hub"


def _hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface"


def hf_token() -> str | None:
    """HF_TOKEN, else the token ``hf auth login`` cached (HF_TOKEN_PATH or HF_HOME/token),
    else whatever ``huggingface_hub.get_token`` finds."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    # huggingface_hub reads these paths once at import; read them now so the
    # environment of this call counts.
    path = Path(os.environ.get("HF_TOKEN_PATH") or _hf_home() / "token").expanduser()
    try:
        cached = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        cached = ""
    if cached:
        return cached
    try:
        from huggingface_hub import get_token
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    try:
        return get_token() or None
    except Exception:  # an unreadable token file is "no token", not a crash
        return None


class Settings(BaseSettings):
    """Configuration read from ``AUDITOR_*`` environment variables (then ``HF_*``).

    ``database_url`` defaults to a SQLite file in ``data_dir``; alembic reads the same value.
    """

    model_config = SettingsConfigDict(env_prefix="AUDITOR_", frozen=True, extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path.home() / ".local" / "share" / "auditor")
    database_url: str | None = None
    hub_endpoint: str = DEFAULT_ENDPOINT
    # Never logged, never stored: SecretStr keeps it out of reprs.
    hub_token: SecretStr | None = None
    # None: the standard Hub cache (shared with transformers, hf download...).
    cache_dir: Path | None = None
    disk_budget_bytes: int = 20 * 1024**3
    workers: int = 2
    crawl_interval_seconds: int = 600
    metrics_port: int | None = None
    probe_file: Path | None = None
    barrier_points: int = 11
    # Behavioural checks: "auto" runs them on CUDA when present, else on the CPU
    # (``auditor worker --queues gpu`` sets "cuda").
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
    # Probe budget of the backdoor check per audited model (forward passes and tokens fed
    # to the models, subject and references together); the report says "incomplete" when
    # the search stops at it. About ten times what a tiny model's full search takes
    # (~0.3-0.5 M tokens): a pathological search stays within minutes on 2 CPU cores.
    backdoor_max_forward_passes: int = 20_000
    backdoor_max_tokens: int = 4_000_000
    # ... and in compute (FLOPs, about 2 x params per token): the token cap above is what a
    # tiny model's search may take; at 1B parameters 4 M tokens would be ~1e16 FLOPs, hours
    # on 2 CPU cores. The search's tokens shrink to fit these (the report says incomplete,
    # AUD205, when it stops there). Measured on 2 cores (bench_scale, 1B, bf16): 6e13 (25k
    # tokens) took 432 s, not the 2 minutes it was meant to; 3e13 is ~12k tokens, ~3.5
    # minutes. The deeper search is the GPU's (``backdoor_gpu_flops``, the gpu queue).
    backdoor_cpu_flops: float = 3e13
    backdoor_gpu_flops: float = 2e15
    # Directory of rules/*.yaml; default: the rules shipped with the package.
    rules_dir: Path | None = None
    # Limits on every file an uploader writes (auditor.bounded): breaking one is a file
    # issue of that file, never a crash. Real tokenizer.json files reach ~35 MB, tokenizer
    # configs hold 31-digit ints (model_max_length=1e30), headers of sharded giants hold
    # tens of thousands of tensors: the defaults leave a wide margin above all of those.
    max_json_bytes: int = 64 * 1024**2
    max_yaml_bytes: int = 1_000_000
    max_nesting_depth: int = 64
    max_int_digits: int = 64
    max_tensors: int = 200_000
    # Celery backend (``auditor daemon --backend celery`` + ``auditor worker``).
    broker_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672//")
    # Queue names are ``<prefix>.cpu`` and ``<prefix>.gpu`` (tests use a random prefix).
    queue_prefix: str = "auditor"
    # Route the behavioural pass of audits to the gpu queue (only when GPU workers run):
    # cpu workers then analyse the weights of every model and defer its behavioural checks.
    gpu_queue: bool = False
    # Daemon audits on the CPU of models whose weight files exceed this many bytes run in
    # two passes: weights, lineage and rules first (the report says what is pending), the
    # behavioural checks in a second pass queued behind every first pass (on the gpu queue
    # with ``gpu_queue``). At 1B parameters those checks take minutes on 2 cores, the
    # weight analysis seconds: a day's uploads get their lineage verdicts first. 0: never.
    defer_behaviour_bytes: int = 512 * 1024**2
    # Bytes of base weights a process keeps in memory between audits (least recently used
    # out first): a worker's next derivative of the same base then reads only itself. The
    # behavioural stage evicts the base it needs the memory of. 0: read the base per audit.
    resident_base_bytes: int = 4 * 1024**3
    # Seconds between a worker's heartbeats in the store (``auditor status``).
    worker_heartbeat_seconds: float = 10.0
    # Celery workers' audit lease, retries and SIGTERM grace (``auditor worker`` options).
    lease_seconds: float = 300.0
    max_attempts: int = 5
    retry_backoff_seconds: float = 30.0
    worker_grace_seconds: float = 60.0

    @model_validator(mode="before")
    @classmethod
    def _hf_conventions(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "hub_endpoint" not in data and os.environ.get("HF_ENDPOINT"):
            data["hub_endpoint"] = os.environ["HF_ENDPOINT"]
        if "hub_token" not in data:
            token = hf_token()
            if token:
                data["hub_token"] = token
        return data

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'auditor.db'}"

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or hf_hub_cache()

    @property
    def shared_cache(self) -> bool:
        """True when downloads go to the user's standard Hub cache."""
        return self.cache_dir is None

    @property
    def effective_disk_budget(self) -> int | None:
        """The budget to evict down to; None: never evict.

        The standard Hub cache holds the user's other models too, so it is only trimmed
        when a budget was set explicitly (AUDITOR_DISK_BUDGET_BYTES).
        """
        if self.shared_cache and "disk_budget_bytes" not in self.model_fields_set:
            return None
        return self.disk_budget_bytes

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
