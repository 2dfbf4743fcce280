"""The fingerprint cache: every model the auditor reads leaves its fingerprint, keyed by
content (the revision sha: a Hub commit, or the file-hash digest of a local folder) and by
the base it was taken against. A later audit, CLI or daemon, neither reads nor aligns that
model again, and the on-demand audit compares against the cached homologues of its base.

The cache lives in the product's database (``Settings.resolved_database_url``). It is an
optimisation: when the database cannot be opened the audit runs without it and says so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from auditor import ANALYSIS_VERSION
from auditor.detectors.context import BASE_WEIGHTS_KEY
from auditor.store.models import CachedFingerprint

if TYPE_CHECKING:
    from auditor.settings import Settings

log = logging.getLogger(__name__)

# The base's own weights fingerprint is stored under this base key.
WEIGHTS_KEY = BASE_WEIGHTS_KEY

_UPGRADE_LOCK = threading.Lock()
_FACTORIES: dict[str, Any] = {}


@dataclass(frozen=True)
class CachedEntry:
    repo_id: str
    content_key: str
    fingerprint: Any  # auditor.analysis.fingerprint.Fingerprint
    meta: dict[str, Any]


def _version() -> str:
    from auditor.analysis.fingerprint import FINGERPRINT_VERSION

    return f"{ANALYSIS_VERSION}/fp{FINGERPRINT_VERSION}"


class FingerprintCache:
    """Get and put fingerprints by (content key, base key); list a base's homologues."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._factory: Any = None
        self.disabled_reason: str | None = None
        self.hits = 0
        self.stores = 0

    def _session_factory(self) -> Any:
        if self._factory is None and self.disabled_reason is None:
            from auditor.store.db import make_engine, session_factory, upgrade_database

            url = self._settings.resolved_database_url
            try:
                if url.startswith("sqlite:///"):
                    self._settings.data_dir.mkdir(parents=True, exist_ok=True)
                # Alembic's command API is not thread-safe (daemon workers are threads):
                # one migration per database per process, under a lock.
                with _UPGRADE_LOCK:
                    if url not in _FACTORIES:
                        upgrade_database(url)
                        # one engine (and pool) per database per process, not per audit
                        _FACTORIES[url] = session_factory(make_engine(url))
                    self._factory = _FACTORIES[url]
            except (SQLAlchemyError, OSError, KeyError) as exc:
                self.disabled_reason = f"fingerprint cache unavailable: {exc}"
                log.warning("%s", self.disabled_reason)
        return self._factory

    @contextmanager
    def _session(self) -> Iterator[Session | None]:
        factory = self._session_factory()
        if factory is None:
            yield None
            return
        with factory() as session:
            yield session

    def get(self, content_key: str, base_key: str) -> CachedEntry | None:
        from auditor.analysis.fingerprint import Fingerprint

        try:
            with self._session() as session:
                if session is None:
                    return None
                row = session.scalars(select(CachedFingerprint).where(
                    CachedFingerprint.content_key == content_key,
                    CachedFingerprint.base_key == base_key,
                    CachedFingerprint.analysis_version == _version(),
                )).first()
                if row is None:
                    return None
                entry = CachedEntry(repo_id=row.repo_id, content_key=row.content_key,
                                    fingerprint=Fingerprint.from_bytes(row.data),
                                    meta=dict(row.meta or {}))
        except SQLAlchemyError as exc:
            log.warning("fingerprint cache read failed: %s", exc)
            return None
        self.hits += 1
        return entry

    def has(self, content_key: str, base_key: str) -> bool:
        try:
            with self._session() as session:
                if session is None:
                    return False
                return session.scalar(select(CachedFingerprint.id).where(
                    CachedFingerprint.content_key == content_key,
                    CachedFingerprint.base_key == base_key,
                    CachedFingerprint.analysis_version == _version(),
                ).limit(1)) is not None
        except SQLAlchemyError:
            return False

    def put(self, *, content_key: str, base_key: str, repo_id: str,
            base_repo_id: str | None, fingerprint: Any, meta: dict[str, Any]) -> None:
        try:
            with self._session() as session:
                if session is None:
                    return
                session.add(CachedFingerprint(
                    content_key=content_key, base_key=base_key, analysis_version=_version(),
                    repo_id=repo_id, base_repo_id=base_repo_id,
                    data=fingerprint.to_bytes(), meta=meta,
                ))
                session.commit()
        except IntegrityError:
            return  # another audit stored the same content first: same fingerprint
        except SQLAlchemyError as exc:
            log.warning("fingerprint cache write failed: %s", exc)
            return
        self.stores += 1

    def homologues(self, base_key: str, *, exclude: set[str], limit: int) -> list[CachedEntry]:
        """Cached fingerprints taken against ``base_key`` (one indexed query), newest first,
        at most ``limit``, one per repo, none whose content key is in ``exclude``."""
        from auditor.analysis.fingerprint import Fingerprint

        out: list[CachedEntry] = []
        seen: set[str] = set()
        try:
            with self._session() as session:
                if session is None:
                    return []
                rows = session.execute(select(
                    CachedFingerprint.repo_id, CachedFingerprint.content_key,
                    CachedFingerprint.data, CachedFingerprint.meta,
                ).where(
                    CachedFingerprint.base_key == base_key,
                    CachedFingerprint.analysis_version == _version(),
                ).order_by(CachedFingerprint.id.desc()))
                for repo_id, key, data, meta in rows:
                    if key in exclude or repo_id in seen:
                        continue
                    seen.add(repo_id)
                    out.append(CachedEntry(repo_id=repo_id, content_key=key,
                                           fingerprint=Fingerprint.from_bytes(data),
                                           meta=dict(meta or {})))
                    if len(out) >= limit:
                        break
        except SQLAlchemyError as exc:
            log.warning("fingerprint cache query failed: %s", exc)
            return []
        return out
