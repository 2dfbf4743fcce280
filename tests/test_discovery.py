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
                for repo, rows in provenance.derivatives_of(session, base_repo_id=WATCHED).items()}
    assert ways["alice/ft-declared"] == {"declared"}
    assert ways["mkit/merge-declared"] == {"family_tree"}
    for repo, how in zoo.derivatives.items():
        if "no card" in how or "another base" in how:
            assert ways[repo] == {"discovered"}, repo
    # The base page and its owner's page list the derivatives found from their weights.
    from auditor.reports.from_store import site_data_from_store
    from auditor.reports.site import build_site, slugify
    from auditor.store import policy

    with factory() as session:
        policy.watch_add(session, repo_id=WATCHED)
        data = site_data_from_store(session)
    build_site(hub_root.parent / "site", data)
    for page in (f"bases/{slugify(WATCHED)}.html", f"owners/{slugify('acme')}.html"):
        html = (hub_root.parent / "site" / page).read_text()
        listed = html.split('id="discovered"', 1)[1]
        for repo, how in zoo.derivatives.items():
            assert (repo in listed) == ("no card" in how or "another base" in how), (page, repo)
        assert "no model card" in listed and "other/base" in listed
        assert not any(u in listed.replace("other/base", "") for u in zoo.unrelated
                       if u != "other/base")
    # The cursor holds: a second crawl examines nothing new and queues nothing.
    with factory() as session:
        again = crawl_base(session, client, WATCHED, config_hash="t")
    assert again.ok and again.queued == [] and again.examined == 0


def test_lying_cards_are_findings(hub_root: Path, hub_server: Any, hf_cache: Path,
                                  tmp_path: Path) -> None:
    from auditor.orchestrator import audit_revision
    from auditor.settings import Settings

    zoo = build(hub_root)
    url = hub_server(hub_root).url
    client = client_for(url, hf_cache)
    settings = Settings(hub_endpoint=url, cache_dir=hf_cache, data_dir=tmp_path)
    expected = {"no_card": "AUD601", "other_base": "AUD602", "finetune_for_merge": "AUD603",
                "wrong_parents": "AUD604"}
    honest = "alice/ft-declared"
    against = [honest, "bob/ft-declared", "liar/ft-otherbase", "ghost/ft-nocard"]
    for repo in ("ghost/ft-nocard", "liar/ft-otherbase", "liar/merge-says-ft",
                 "liar/wrong-parents", honest):
        report = audit_revision(repo, base=WATCHED, against=against, settings=settings,
                                client=client).report
        rules = {f.rule_id for f in report.findings if f.rule_id.startswith("AUD60")}
        assert report.provenance.derived_from_base is True, repo
        want = {expected[zoo.lying[repo]]} if repo in zoo.lying else set()
        assert rules == want, (repo, rules)


def test_unrelated_base_is_not_derived(hub_root: Path, hub_server: Any, hf_cache: Path) -> None:
    from auditor.analysis.card_claims import probe_against_base

    build(hub_root)
    client = client_for(hub_server(hub_root).url, hf_cache)
    derived, distance, _z = probe_against_base(client, client.resolve("other/ft"),
                                               client.resolve(WATCHED))
    assert derived is False and distance is not None and distance > 0.9


def test_probe_reads_downloaded_files_in_place(hub_root: Path, hub_server: Any,
                                               hf_cache: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit has the weights on disk already: the provenance probe gives the same
    answer from them, with no range request to the Hub."""
    from auditor.analysis.card_claims import probe_against_base
    from auditor.detectors.context import fetch_model
    from auditor.hub import range as hub_range

    build(hub_root)
    client = client_for(hub_server(hub_root).url, hf_cache)
    subject, base = client.resolve("alice/ft-declared"), client.resolve(WATCHED)
    remote = probe_against_base(client, subject, base)
    files = {r.repo_id: fetch_model(client, r).files for r in (subject, base)}

    def no_http(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a range request for a downloaded file")

    monkeypatch.setattr(hub_range, "RangeFile", no_http)
    local = probe_against_base(client, subject, base, subject_files=files[subject.repo_id],
                               base_files=files[base.repo_id])
    assert local == remote and local[0] is True


def test_server_ignoring_range_is_streamed_and_cut(hub_root: Path, hub_server: Any,
                                                   hf_cache: Path,
                                                   factory: sessionmaker[Session]) -> None:
    from auditor.hub.range import open_range
    from auditor.weights.safetensors_io import parse_header

    zoo = build(hub_root)
    client = client_for(hub_server(hub_root, ignore_range=True).url, hf_cache)
    resolved = client.resolve("ghost/ft-nocard")
    size = resolved.files["model.safetensors"]
    with open_range(client, resolved, "model.safetensors", max_stream_bytes=size // 100) as src:
        header = parse_header(src)
        assert src.range_ignored
        assert header.tensors  # right bytes, although the server ignored Range
        assert src.bytes_transferred < size // 4  # stopped long before the whole file
        with pytest.raises(Exception, match="ignores Range"):
            src.read(size - 16, 16)  # deep reads are refused, never streamed
    with factory() as session:
        result = crawl_base(session, client, WATCHED, config_hash="t")
    assert result.ok, result.error
    with factory() as session:
        queued = {r["repo_id"] for r in audit_rows(session)}
    assert queued == set(zoo.derivatives)


def test_tree_walk_is_bounded_newest_first_and_resumes(
        hub_root: Path, hub_server: Any, hf_cache: Path, factory: sessionmaker[Session]) -> None:
    from tests.discovery_zoo import finetune, llama_tensors
    from tests.fixtures_hub import make_repo

    base = llama_tensors(0, vocab=64)
    make_repo(hub_root, WATCHED, base, {"license": "mit"},
              meta={"createdAt": "2025-03-01T00:00:00Z"})
    members = [f"m{i}/ft" for i in range(6)]
    for i, repo in enumerate(members):
        make_repo(hub_root, repo, finetune(base, i, 0.01),
                  {"base_model": WATCHED, "base_model_relation": "finetune"},
                  meta={"createdAt": f"2025-03-01T{1 + i:02d}:00:00Z"})
    client = client_for(hub_server(hub_root).url, hf_cache)

    def crawl() -> Any:
        with factory() as session:
            return crawl_base(session, client, WATCHED, config_hash="t", discovery=False,
                              tree_budget=2)

    first = crawl()  # records the members; nothing to walk yet
    assert first.ok and set(first.new_repos) == set(members)
    # Every member gets a child that names only its parent (a merge's card does that).
    for i, repo in enumerate(members):
        make_repo(hub_root, f"kid{i}/merge", finetune(base, 50 + i, 0.01),
                  {"base_model": repo, "base_model_relation": "merge"},
                  meta={"createdAt": f"2025-03-02T{1 + i:02d}:00:00Z"})
    found: list[list[str]] = []
    # Budget 2: one listing for the newest member, one for the rotation. The rotation goes
    # through the 6 members and the children it finds, so 12 crawls reach every member.
    for _ in range(12):
        result = crawl()
        assert result.ok and result.tree_listed <= 2
        found.append(sorted(result.new_repos))
    # The newest member's child comes first; the rotation reaches every member's child.
    assert found[0] == ["kid5/merge"]
    assert sorted(r for crawl_found in found for r in crawl_found) == \
        sorted(f"kid{i}/merge" for i in range(6))
