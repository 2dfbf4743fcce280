"""What an on-demand ``auditor audit`` borrows from the store, when there is one: the
fingerprints of the base's known derivatives (candidates without a download) and the
owners' authorizations. Without a database it borrows nothing and says so."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auditor import ANALYSIS_VERSION
from auditor.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class StoreContext:
    homologues: dict[str, Any] = field(default_factory=dict)
    authorizations: list[Any] = field(default_factory=list)
    available: bool = False


def store_exists(settings: Settings) -> bool:
    """A database was configured, or the default SQLite file is already there."""
    if settings.database_url:
        return True
    return Path(settings.data_dir / "auditor.db").exists()


def load_store_context(settings: Settings, *, base_repo_id: str | None,
                       subject_repo_id: str) -> StoreContext:
    """Homologues of ``base_repo_id`` and all authorizations; empty if no store."""
    if not store_exists(settings):
        return StoreContext()
    from auditor.daemon.worker import _homologue_refs
    from auditor.store.authorizations import current_authorizations
    from auditor.store.catalog import stored_homologues
    from auditor.store.db import migrated_session

    ctx = StoreContext(available=True)
    with migrated_session(settings.resolved_database_url) as session:
        ctx.authorizations = current_authorizations(session)
        if base_repo_id:
            stored = stored_homologues(session, base_repo_id=base_repo_id,
                                       exclude_repo_id=subject_repo_id,
                                       analysis_version=ANALYSIS_VERSION)
            ctx.homologues = _homologue_refs(stored) if stored else {}
    return ctx
