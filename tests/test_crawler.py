"""Crawler against the real local Hub server: new repos, new commits, gated, crashes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from auditor.daemon import crawler
from auditor.daemon.crawler import crawl_base
from auditor.errors import TransientHubError
from auditor.hub.client import HubClient
from auditor.store import catalog
from auditor.store.models import CrawlCursor
from tests.test_daemon_support import (
    BASE,
    DERIVATIVES,
    audit_rows,
    make_model,
    make_zoo,
    new_commit,
)

CONFIG_HASH = "test-config"


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    from auditor.store.db import make_engine, session_factory, upgrade_database

    url = f"sqlite:///{tmp_path / 'auditor.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def client_for(url: str, cache: Path, *, token: str | None = None, retries: int = 3
               ) -> HubClient:
    return HubClient(endpoint=url, token=token, cache_dir=cache, disk_budget_bytes=None,
                     max_retries=retries, backoff_seconds=0.01, max_wait_seconds=0.1)


def crawl(factory: sessionmaker[Session], client: HubClient) -> Any:
    with factory() as session:
        return crawl_base(session, client, BASE, config_hash=CONFIG_HASH)


def test_crawl_queues_every_derivative_once_then_only_new(
        hub_root: Path, hub_server: Any, hf_cache: Path, factory: sessionmaker[Session]) -> None:
    make_zoo(hub_root)
    client = client_for(hub_server(hub_root, page_size=2).url, hf_cache)  # several pages

    first = crawl(factory, client)
    assert first.ok, first.error
    assert sorted(first.new_repos) == sorted(DERIVATIVES)
    assert len(first.queued) == len(DERIVATIVES)
    with factory() as session:
        rows = audit_rows(session)
        assert sorted(r["repo_id"] for r in rows) == sorted(DERIVATIVES)
        assert {r["status"] for r in rows} == {"queued"}
        cursor = catalog.get_cursor(session, base_repo_id=BASE)
        assert cursor is not None and cursor.last_success_at is not None
        assert cursor.last_created_at is not None and cursor.last_created_at.day == 1
        repo = catalog.get_repo(session, repo_id="alice/ft-a")
        assert repo is not None and repo.declared_base_models == [BASE]
        assert repo.family_bases == [BASE] and repo.declared_relation == "finetune"

    again = crawl(factory, client)
    assert again.ok and again.queued == [] and again.new_repos == []

    # A new upload, created after everything the cursor saw: only it is queued.
    make_model(hub_root, "erin/ft-e", seed=9, hours=30)
    third = crawl(factory, client)
    assert third.ok, third.error
    assert third.new_repos == ["erin/ft-e"]
    assert len(third.queued) == 1
    with factory() as session:
        rows = audit_rows(session)
    assert len(rows) == len(DERIVATIVES) + 1
    assert len({(r["repo_id"], r["sha"]) for r in rows}) == len(rows)


def test_new_commit_of_known_repo_is_queued(
        hub_root: Path, hub_server: Any, hf_cache: Path, factory: sessionmaker[Session]) -> None:
    make_zoo(hub_root)
    repo = make_model(hub_root, "gitty/ft-g", seed=7, hours=2, git=True)  # old createdAt
    client = client_for(hub_server(hub_root).url, hf_cache)
    assert crawl(factory, client).ok
    with factory() as session:
        before = {r["sha"] for r in audit_rows(session) if r["repo_id"] == "gitty/ft-g"}
    assert len(before) == 1

    sha = new_commit(repo, seed=77)
    result = crawl(factory, client)
    assert result.ok, result.error
    assert result.new_revisions == [("gitty/ft-g", sha)]
    assert len(result.queued) == 1
    with factory() as session:
        shas = [r["sha"] for r in audit_rows(session) if r["repo_id"] == "gitty/ft-g"]
    assert sorted(shas) == sorted([*before, sha])
    # Nothing else was queued twice.
    assert crawl(factory, client).queued == []


def test_gated_and_private_repos_skipped_with_reason(
        hub_root: Path, hub_server: Any, hf_cache: Path, factory: sessionmaker[Session]) -> None:
    make_model(hub_root, BASE, seed=0, hours=0, base=None)
    make_model(hub_root, "alice/open", seed=1, hours=1)
    make_model(hub_root, "gate/keeper", seed=2, hours=2, meta={"gated": "manual"})
    make_model(hub_root, "secret/priv", seed=3, hours=3, meta={"private": True})
    url = hub_server(hub_root, tokens=["tok"]).url

    anonymous = crawl(factory, client_for(url, hf_cache))
    assert anonymous.ok
    assert "secret/priv" not in anonymous.new_repos  # hidden from anonymous callers
    assert set(anonymous.skipped) == {"gate/keeper"}
    assert "gated" in anonymous.skipped["gate/keeper"]
    with factory() as session:
        rows = {r["repo_id"]: r for r in audit_rows(session)}
        assert rows["gate/keeper"]["status"] == "skipped"
        assert "gated" in rows["gate/keeper"]["error"]
        assert rows["alice/open"]["status"] == "queued"
        gated = catalog.get_repo(session, repo_id="gate/keeper")
        assert gated is not None and gated.gated and "gated" in (gated.skip_reason or "")

    # With a token the private repo is visible, and skipped: reports are public.
    with factory() as session:
        session.execute(CrawlCursor.__table__.delete())
        session.commit()
    with_token = crawl(factory, client_for(url, hf_cache, token="tok"))
    assert with_token.ok
    assert with_token.skipped == {"secret/priv": "private repo"}


def test_crash_mid_crawl_keeps_cursor_and_recrawl_is_idempotent(
        hub_root: Path, hub_server: Any, hf_cache: Path, factory: sessionmaker[Session],
        monkeypatch: pytest.MonkeyPatch) -> None:
    make_zoo(hub_root)
    client = client_for(hub_server(hub_root).url, hf_cache)
    real_record = crawler._record
    seen: list[str] = []

    def crashing(session: Session, summary: Any, **kwargs: Any) -> None:
        if len(seen) == 2:
            raise KeyboardInterrupt("simulated crash")
        seen.append(summary.repo_id)
        real_record(session, summary, **kwargs)

    monkeypatch.setattr(crawler, "_record", crashing)
    with pytest.raises(KeyboardInterrupt):
        crawl(factory, client)
    with factory() as session:
        assert catalog.get_cursor(session, base_repo_id=BASE) is None  # never moved
        assert len(audit_rows(session)) == 2
    monkeypatch.setattr(crawler, "_record", real_record)

    result = crawl(factory, client)
    assert result.ok
    with factory() as session:
        rows = audit_rows(session)
    assert sorted(r["repo_id"] for r in rows) == sorted(DERIVATIVES)  # each exactly once
    assert len(result.queued) == len(DERIVATIVES) - 2


def test_listing_failure_recorded_and_cursor_kept(
        hub_root: Path, hub_server: Any, hf_cache: Path, factory: sessionmaker[Session],
        monkeypatch: pytest.MonkeyPatch) -> None:
    make_zoo(hub_root)
    client = client_for(hub_server(hub_root).url, hf_cache)
    real_list = client.list_derivatives

    def failing_pages(base: str, **kwargs: Any) -> Iterator[Any]:
        for i, summary in enumerate(real_list(base, **kwargs)):
            if i == 2:  # a later page fails after the client's own retries
                raise TransientHubError("list derivatives: server error 503")
            yield summary

    monkeypatch.setattr(client, "list_derivatives", failing_pages)
    result = crawl(factory, client)
    assert not result.ok and "503" in (result.error or "")
    with factory() as session:
        cursor = catalog.get_cursor(session, base_repo_id=BASE)
        assert cursor is not None
        assert cursor.last_success_at is None and cursor.last_created_at is None
        assert "503" in (cursor.last_error or "")
        assert len(audit_rows(session)) == 2  # recorded, and harmless to record again

    monkeypatch.setattr(client, "list_derivatives", real_list)
    assert crawl(factory, client).ok
    with factory() as session:
        assert sorted(r["repo_id"] for r in audit_rows(session)) == sorted(DERIVATIVES)


def test_crawl_walks_the_family_tree(
        hub_root: Path, hub_server: Any, hf_cache: Path, factory: sessionmaker[Session]) -> None:
    # A declared merge names its parents, not the base, in its card: only the walk down
    # the family tree finds it, and a merge of the merge one level further.
    make_zoo(hub_root)
    make_model(hub_root, "mkit/merge-ab", seed=7, hours=10, base=None)
    (hub_root / "mkit/merge-ab/README.md").write_text(
        "---\nbase_model: [alice/ft-a, bob/ft-b]\nbase_model_relation: merge\n---\n")
    make_model(hub_root, "deep/merge-of-merge", seed=8, hours=11, base="mkit/merge-ab")
    client = client_for(hub_server(hub_root).url, hf_cache)

    first = crawl(factory, client)
    assert first.ok, first.error
    assert set(first.new_repos) == {*DERIVATIVES, "mkit/merge-ab", "deep/merge-of-merge"}
    with factory() as session:
        merge = catalog.get_repo(session, repo_id="mkit/merge-ab")
        # The card's declaration and the family the crawl found it in stay apart.
        assert merge is not None and merge.declared_base_models == ["alice/ft-a", "bob/ft-b"]
        assert merge.declared_relation == "merge" and merge.family_bases == [BASE]
    assert "other/unrelated" not in first.new_repos
    again = crawl(factory, client)
    assert again.ok and again.queued == []
