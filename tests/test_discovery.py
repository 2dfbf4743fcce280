"""Discovery: every derivative of a watched base is found and queued whatever its card
says, from a few percent of its bytes; no unrelated model is queued."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from auditor.daemon.crawler import crawl_base
from auditor.hub.client import HubClient
from auditor.store import provenance
from tests.discovery_zoo import WATCHED, build
from tests.test_daemon_support import audit_rows


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    from auditor.store.db import make_engine, session_factory, upgrade_database

    url = f"sqlite:///{tmp_path / 'auditor.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def client_for(url: str, cache: Path) -> HubClient:
    return HubClient(endpoint=url, token=None, cache_dir=cache, disk_budget_bytes=None,
                     max_retries=3, backoff_seconds=0.01, max_wait_seconds=0.1)


def test_every_derivative_found_and_queued_no_unrelated(
        hub_root: Path, hub_server: Any, hf_cache: Path, factory: sessionmaker[Session]) -> None:
    zoo = build(hub_root)
    client = client_for(hub_server(hub_root, page_size=3).url, hf_cache)
    with factory() as session:
        result = crawl_base(session, client, WATCHED, config_hash="t")
    assert result.ok, result.error
    with factory() as session:
        queued = {r["repo_id"] for r in audit_rows(session)}
        assert queued == set(zoo.derivatives), (queued ^ set(zoo.derivatives))
        assert not queued & set(zoo.unrelated)
        ways = {repo: {p.found_by for p in rows}
                for repo, rows in provenance.derivatives_of(session, WATCHED).items()}
    assert ways["alice/ft-declared"] == {"declared"}
    assert ways["mkit/merge-declared"] == {"family_tree"}
    for repo, how in zoo.derivatives.items():
        if "no card" in how or "another base" in how:
            assert ways[repo] == {"discovered"}, repo
    # The cursor holds: a second crawl examines nothing new and queues nothing.
    with factory() as session:
        again = crawl_base(session, client, WATCHED, config_hash="t")
    assert again.ok and again.queued == [] and again.examined == 0
