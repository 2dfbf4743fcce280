"""Resolve a repo id or local folder to a pinned revision, download files, list derivatives.

All traffic goes through the real ``huggingface_hub`` with ``endpoint=``, ``cache_dir=``
and ``token=`` passed explicitly: its module-level constants (HF_ENDPOINT, HF_HUB_CACHE,
HF_TOKEN...) are read at import time, so relying on them would make the settings object
lie. Every huggingface_hub / httpx exception becomes an ``auditor.errors`` type in
``map_hub_error``, the one place that knows both vocabularies.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from auditor.errors import (
    AuditorError,
    EntryNotFound,
    GatedRepo,
    HubError,
    RateLimited,
    RepoNotFound,
    RevisionNotFound,
)
from auditor.hub.card import CardInfo, card_from_data, is_repo_id, parse_card
from auditor.hub.hub_errors import is_retryable, map_hub_error

if TYPE_CHECKING:
    from auditor.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
MERGEKIT_CONFIG = "mergekit_config.yml"
_LOCAL_ID_RE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ResolvedRepo:
    """A repo pinned to one revision: everything later stages need without more lookups."""

    repo_id: str
    revision: str
    files: dict[str, int]
    card: CardInfo
    mergekit_config: dict[str, Any] | None = None
    local_dir: Path | None = None
    gated: str | bool = False
    private: bool = False
    created_at: datetime | None = None
    last_modified: datetime | None = None
    owner: str | None = None
    tags: list[str] = field(default_factory=list)
    # Side files that broke a parser limit or were malformed: (path, message), for the report.
    file_issues: tuple[tuple[str, str], ...] = ()

    @property
    def is_local(self) -> bool:
        return self.local_dir is not None

    @property
    def has_adapter(self) -> bool:
        return "adapter_config.json" in self.files


@dataclass(frozen=True)
class RepoSummary:
    repo_id: str
    sha: str | None
    created_at: datetime | None
    last_modified: datetime | None
    tags: list[str]
    gated: str | bool
    private: bool
    # Filled by full listings (``list_new_models``): enough to pre-filter candidates
    # without reading any weights.
    model_type: str | None = None
    parameters: int | None = None
    library: str | None = None
    files: tuple[str, ...] = ()

    @property
    def has_card(self) -> bool:
        return "README.md" in self.files


def _summary(info: Any) -> RepoSummary:
    config = getattr(info, "config", None)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    st = getattr(info, "safetensors", None)
    total = getattr(st, "total", None) if st is not None else None
    return RepoSummary(
        repo_id=info.id,
        sha=info.sha,
        created_at=info.created_at,
        last_modified=info.last_modified,
        tags=list(info.tags or []),
        gated=info.gated if info.gated in ("auto", "manual") else False,
        private=bool(info.private),
        model_type=model_type if isinstance(model_type, str) else None,
        parameters=int(total) if isinstance(total, int) else None,
        library=getattr(info, "library_name", None),
        files=tuple(s.rfilename for s in (getattr(info, "siblings", None) or [])),
    )


# --- the client --------------------------------------------------------------------
class HubClient:
    """Talk to the Hub (or serve-hub) through huggingface_hub; local folders work too."""

    def __init__(
        self,
        *,
        endpoint: str,
        token: str | None,
        cache_dir: Path,
        disk_budget_bytes: int | None,
        max_retries: int = 3,
        backoff_seconds: float = 1.0,
        max_wait_seconds: float = 30.0,
    ) -> None:
        from huggingface_hub import HfApi

        self.endpoint = endpoint.rstrip("/")
        # Kept private and out of reprs/logs; ``False`` stops huggingface_hub from
        # falling back to a token stored on disk or in HF_TOKEN.
        self._token: str | None = token or None
        self.cache_dir = Path(cache_dir)
        self.disk_budget_bytes = disk_budget_bytes
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.max_wait_seconds = max_wait_seconds
        self.api = HfApi(endpoint=self.endpoint, token=self._hf_token)
        # huggingface_hub draws a tqdm bar per download on a terminal; from parallel
        # workers they leave a blank line each. The commands draw their own progress.
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        from auditor.hub.repo_folders import RepoStore

        # only its folder hashing is used; hashes of big files persist in the cache dir
        # (v2: an LFS file's blob id is its pointer's, so the v1 memo's ids do not mix in)
        memo = self.cache_dir / "local-hashes-v2.jsonl"
        self._local_store = RepoStore(Path("/"), hash_memo=memo)

    def __repr__(self) -> str:
        return f"HubClient(endpoint={self.endpoint!r}, cache_dir={str(self.cache_dir)!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> HubClient:
        return cls(
            endpoint=settings.hub_endpoint,
            token=settings.token_value(),
            cache_dir=settings.resolved_cache_dir,
            disk_budget_bytes=settings.effective_disk_budget,
        )

    @property
    def _hf_token(self) -> str | bool:
        return self._token if self._token else False

    def auth_headers(self) -> dict[str, str]:
        """Headers for direct HTTP calls (range reads); never logged."""
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def file_url(self, resolved: ResolvedRepo, filename: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(resolved.repo_id, filename, revision=resolved.revision,
                          endpoint=self.endpoint)

    def _call(self, fn: Callable[[], T], *, what: str) -> T:
        """Run ``fn`` retrying 429 / transient failures with backoff (Retry-After honoured)."""
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                mapped = map_hub_error(exc, what=what)
                if not is_retryable(mapped) or attempt >= self.max_retries:
                    raise mapped from exc
                wait = self.backoff_seconds * (2**attempt)
                if isinstance(mapped, RateLimited) and mapped.retry_after is not None:
                    wait = mapped.retry_after
                wait = min(wait, self.max_wait_seconds)
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, mapped,
                            attempt + 1, self.max_retries, wait)
                time.sleep(wait)
                attempt += 1

    # ----- resolve -------------------------------------------------------------------
    def resolve(self, spec: str, *, revision: str | None = None,
                local: bool | None = None) -> ResolvedRepo:
        """Pin ``spec`` (a Hub repo id, or a local folder) to one revision.

        A spec is a local folder only when the caller says so: ``local=True`` (``--local``),
        or a spec spelt as a path (``./``, ``../``, ``~/`` or absolute). ``org/name`` is
        always a repo id, even when a folder of that name exists in the working directory:
        otherwise a crawled repo id could make the daemon hash a local tree.
        """
        if local is None:
            local = looks_like_path(spec)
        if local:
            path = Path(spec).expanduser()
            if not path.is_dir():
                raise RepoNotFound(f"{spec!r}: no such local folder")
            return self._resolve_local(path, revision=revision)
        if not is_repo_id(spec):
            raise RepoNotFound(f"{spec!r} is not a valid repo id (prefix a local folder "
                               "with ./ or pass --local)")
        return self._resolve_remote(spec, revision=revision)

    def resolve_related(self, spec: str, *, near: ResolvedRepo,
                        revision: str | None = None) -> ResolvedRepo:
        """Resolve a repo named by ``near`` (its card's base, a parent): for a local folder in
        Hub layout (ROOT/org/name) a sibling folder ROOT/<spec> stands for that repo id."""
        if near.local_dir is not None and is_repo_id(spec) and "/" in spec:
            sibling = near.local_dir.parent.parent / spec
            if sibling.is_dir():
                return self._resolve_local(sibling, revision=revision)
        return self.resolve(spec, revision=revision)

    def _resolve_local(self, folder: Path, *, revision: str | None) -> ResolvedRepo:
        from auditor.hub.repo_folders import RepoLookupError

        folder = folder.resolve()
        name = _local_part(folder.name, "model")
        # A folder in Hub layout (ROOT/<org>/<name>) keeps its Hub id, so owners compare as
        # on the Hub; anything else is owned by "local".
        owner = _local_part(folder.parent.name, "local")
        repo_id = f"{owner}/{name}"
        try:
            snap = self._local_store.folder_snapshot(repo_id, folder, revision or "main",
                                                     self._local_store.meta(folder))
        except RepoLookupError as exc:
            raise RevisionNotFound(f"{folder}: revision {revision!r} does not match the "
                                   "folder's content hash") from exc
        files = {p: e.size for p, e in sorted(snap.files.items())}
        card = CardInfo()
        readme = folder / "README.md"
        if "README.md" in files:
            with readme.open("rb") as fh:
                card = parse_card(fh.read(1_000_001))
        mergekit = None
        issues: list[tuple[str, str]] = [("README.md", w) for w in card.warnings]
        if MERGEKIT_CONFIG in files:
            mergekit, issue = _load_yaml_config(folder / MERGEKIT_CONFIG)
            issues += [(MERGEKIT_CONFIG, issue)] if issue else []
        gated = snap.meta.get("gated", False)
        return ResolvedRepo(
            repo_id=repo_id,
            revision=snap.sha,
            files=files,
            card=card,
            mergekit_config=mergekit,
            local_dir=folder,
            gated=gated if gated in ("auto", "manual") else False,
            private=bool(snap.meta.get("private", False)),
            created_at=snap.created_at,
            last_modified=snap.last_modified,
            owner=owner,
            tags=list(card.tags),
            file_issues=tuple(issues),
        )

    def _resolve_remote(self, repo_id: str, *, revision: str | None) -> ResolvedRepo:
        info = self._call(
            lambda: self.api.model_info(repo_id, revision=revision, files_metadata=True),
            what=f"model_info {repo_id}",
        )
        if not info.sha:
            raise HubError(f"model_info {repo_id}: the server gave no commit sha")
        files = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
        card_data = info.card_data.to_dict() if info.card_data is not None else None
        card = card_from_data(card_data)
        if not card_data and "README.md" in files:
            # No card data from the server although there is a card: its front matter did
            # not parse there. Read it here (bounded) so the report says why, not just
            # "no base_model".
            card = self._card_from_readme(repo_id, info.sha, files) or card
        resolved = ResolvedRepo(
            repo_id=repo_id,
            revision=info.sha,
            files=files,
            card=card,
            gated=info.gated if info.gated in ("auto", "manual") else False,
            private=bool(info.private),
            created_at=info.created_at,
            last_modified=info.last_modified,
            owner=info.author or (repo_id.partition("/")[0] if "/" in repo_id else None),
            tags=list(info.tags or []),
            file_issues=tuple(("README.md", w) for w in card.warnings),
        )
        if MERGEKIT_CONFIG in files:
            issue = None
            try:
                config, issue = _load_yaml_config(self.fetch(resolved, MERGEKIT_CONFIG))
            except GatedRepo:
                config = None  # resolving a gated repo is fine; fetching weights is not
            extra = ((MERGEKIT_CONFIG, issue),) if issue else ()
            resolved = _replace(resolved, mergekit_config=config,
                                file_issues=resolved.file_issues + extra)
        return resolved

    def _card_from_readme(self, repo_id: str, sha: str, files: dict[str, int]) -> CardInfo | None:
        from auditor.hub.card import MAX_CARD_BYTES

        if files.get("README.md", 0) > MAX_CARD_BYTES:
            return CardInfo(warnings=[f"card larger than {MAX_CARD_BYTES} bytes: not read"])
        probe = ResolvedRepo(repo_id=repo_id, revision=sha, files=files, card=CardInfo())
        try:
            path = self.fetch(probe, "README.md")
            with path.open("rb") as fh:
                return parse_card(fh.read(MAX_CARD_BYTES + 1))
        except (AuditorError, OSError) as exc:
            log.warning("%s: card not readable: %s", repo_id, exc)
            return None

    # ----- files -----------------------------------------------------------------------
    def local_path(self, resolved: ResolvedRepo, filename: str) -> Path:
        """The file inside a local folder, refusing paths that escape it."""
        assert resolved.local_dir is not None
        from auditor.hub.repo_folders import safe_relpath

        rel = safe_relpath(filename)
        base = resolved.local_dir.resolve()
        if rel is None:
            raise EntryNotFound(f"{filename!r}: path escapes the model folder")
        path = (base / rel).resolve()
        if not path.is_relative_to(base):
            raise EntryNotFound(f"{filename!r}: path escapes the model folder")
        if not path.is_file():
            raise EntryNotFound(f"{filename!r} not found in {base}")
        return path

    def fetch(self, resolved: ResolvedRepo, filename: str) -> Path:
        """A local path to ``filename`` at exactly ``resolved.revision``."""
        if resolved.local_dir is not None:
            return self.local_path(resolved, filename)
        if filename not in resolved.files:
            raise EntryNotFound(f"{resolved.repo_id}@{resolved.revision[:12]}: no file "
                                f"{filename!r}")
        from huggingface_hub import hf_hub_download

        path = Path(self._call(
            lambda: hf_hub_download(
                resolved.repo_id, filename, revision=resolved.revision,
                endpoint=self.endpoint, cache_dir=self.cache_dir, token=self._hf_token,
            ),
            what=f"download {resolved.repo_id}/{filename}",
        ))
        _touch(path)
        if self.disk_budget_bytes is not None:
            from auditor.hub.cache import enforce_disk_budget

            enforce_disk_budget(self.cache_dir, self.disk_budget_bytes,
                                protect={resolved.revision})
        return path

    def list_derivatives(self, base_repo_id: str, *, limit: int | None = None,
                         sort: Literal["created_at", "last_modified"] = "created_at",
                         ) -> Iterator[RepoSummary]:
        """Repos declaring ``base_repo_id`` as a base model, newest first (by ``sort``)."""
        if not is_repo_id(base_repo_id):
            raise RepoNotFound(f"{base_repo_id!r} is not a valid repo id")
        return self._listing(
            lambda: self.api.list_models(filter=f"base_model:{base_repo_id}", sort=sort,
                                         limit=limit, full=True),
            what=f"list derivatives of {base_repo_id}")

    def list_new_models(self, *, filters: list[str], limit: int | None = None
                        ) -> Iterator[RepoSummary]:
        """Every model carrying all ``filters`` tags (library, model_type...), newest
        first by creation, with its config's model_type, safetensors parameter count and
        file names: what discovery needs before reading a single weight byte."""
        return self._listing(
            lambda: self.api.list_models(filter=filters, sort="created_at", limit=limit,
                                         full=True, fetch_config=True),
            what=f"list new models ({', '.join(filters)})")

    def _listing(self, start: Callable[[], Any], *, what: str) -> Iterator[RepoSummary]:
        iterator = self._call(lambda: iter(start()), what=what)
        while True:
            try:
                info = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                # Pages are fetched lazily here and huggingface_hub's paginate already
                # retried them with backoff: surface the failure, do not restart the listing.
                raise map_hub_error(exc, what=what) from exc
            yield _summary(info)


_MAX_ID_PART = 96  # the Hub's limit per part of a repo id


def _local_part(raw: str, default: str) -> str:
    """A folder name as one part of a repo id: Hub characters, at most 96 of them.

    Longer names (a folder may have 255 bytes) keep a readable prefix plus a hash of the
    whole name, so distinct folders stay distinct ids and every store column holds them.
    """
    import hashlib

    part = _LOCAL_ID_RE.sub("-", raw).strip("-.")
    while "--" in part or ".." in part:
        part = part.replace("--", "-").replace("..", ".")
    if len(part) > _MAX_ID_PART:
        digest = hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        part = f"{part[:_MAX_ID_PART - 13].rstrip('-.')}-{digest}"
    return part or default


def looks_like_path(spec: str) -> bool:
    """A spec spelt as a path: ``./x``, ``../x``, ``~/x``, ``.``, ``..`` or absolute."""
    return (spec in (".", "..", "~") or spec.startswith(("./", "../", "~/", ".\\", "..\\"))
            or Path(spec).is_absolute())


def _replace(resolved: ResolvedRepo, **changes: Any) -> ResolvedRepo:
    from dataclasses import replace

    return replace(resolved, **changes)


def _touch(path: Path) -> None:
    """Record an access on the blob so cache eviction is LRU even on noatime mounts."""
    try:
        blob = path.resolve()
        st = blob.stat()
        os.utime(blob, (time.time(), st.st_mtime))
    except OSError:
        pass


def _load_yaml_config(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Bounded safe-load of a YAML config: (data, None), or (None, why it was refused)."""
    from auditor.bounded import load_yaml_file

    try:
        data = load_yaml_file(path, name=path.name)
    except AuditorError as exc:
        return None, str(exc)
    if not isinstance(data, dict):
        return None, f"{path.name}: not a mapping"
    # Re-use the card's JSON-safety pass so odd YAML types never reach the report.
    return card_from_data(data).data, None
