"""A representative subset of the hostile corpus through a daemon crawl, on SQLite and
PostgreSQL: the crawl ends, no audit stays running, findings next to the breakage are kept,
the database holds only finite JSON, ``report build`` completes, no payload runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select
from typer.testing import CliRunner

from auditor.cli import app
from auditor.daemon.scheduler import Daemon
from auditor.daemon.worker import RetryPolicy
from auditor.hub.client import HubClient
from auditor.settings import Settings
from auditor.store import policy
from auditor.store.db import make_engine, session_factory, upgrade_database
from auditor.store.models import Audit, FindingRow
from tests import hostile_corpus as hc
from tests.test_hostile_audit import NAN_NUMBER, strict_json

SUBSET = ["nan_one_tensor", "nan_clone", "mergekit_bigint", "config_deep", "header_deep",
          "header_absurd_shape", "tokenizer_json_deep", "card_hex_int", "truncated_header",
          "overlapping_offsets", "pickle_logging_dictconfig_popen",
          "pickle_doctest_run_docstring_examples", "pickle_computed_stack_global"]


def _subset_hub(tmp_path: Path) -> tuple[Path, Path, dict[str, hc.Case]]:
    full = tmp_path / "full"
    marker = tmp_path / "PAYLOAD-RAN"
    cases = hc.write_hub(full, marker)
    root = tmp_path / "hub"
    for repo in [hc.BASE_ID, hc.VICTIM_ID] + [cases[n].repo_id for n in SUBSET]:
        shutil.copytree(full / repo, root / repo)
    return root, marker, {n: cases[n] for n in SUBSET}


def test_hostile_subset_through_daemon_crawl(tmp_path: Path, hub_server: Any, db_url: str
                                             ) -> None:
    root, marker, cases = _subset_hub(tmp_path)
    server = hub_server(root)
    client = HubClient(endpoint=server.url, token=None, cache_dir=tmp_path / "cache",
                       disk_budget_bytes=None, max_retries=1, backoff_seconds=0.01)
    upgrade_database(db_url)
    engine = make_engine(db_url)
    factory = session_factory(engine)
    with factory() as session:
        policy.watch_add(session, repo_id=hc.BASE_ID)
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url)
    daemon = Daemon(settings=settings, database_url=db_url, client=client, workers=2,
                    interval_seconds=3600, poll_seconds=0.05,
                    retry=RetryPolicy(max_attempts=2, backoff_seconds=0.05))
    try:
        results = daemon.run_once()
    finally:
        daemon.close()
    assert all(r.ok for r in results), [r.error for r in results]
    with factory() as session:
        audits = list(session.scalars(select(Audit)))
        findings = list(session.scalars(select(FindingRow)))
        by_repo: dict[str, set[str]] = {}
        for f in findings:
            by_repo.setdefault(f.subject_repo, set()).add(f.rule_id)
        statuses = {a.status for a in audits}
        reports = [a.report for a in audits if a.report]
    engine.dispose()
    assert statuses <= {"done", "failed", "skipped"}, statuses  # nothing left running
    listed = {c.repo_id for c in cases.values() if c.name != "card_hex_int"}
    # card_hex_int's card does not parse: it declares no base, so it is not crawled; the
    # others are, and each keeps the gadget pickle's finding next to its own breakage.
    for repo_id in listed:
        assert "AUD301" in by_repo.get(repo_id, set()), (repo_id, by_repo)
    assert "AUD501" in by_repo["hostile/nan-one-tensor"]
    assert "AUD501" in by_repo["hostile/nan-clone"]
    for report in reports:
        strict_json(json.dumps(report, allow_nan=True))
    env = {"AUDITOR_DATABASE_URL": db_url, "AUDITOR_DATA_DIR": str(tmp_path / "data")}
    site = tmp_path / "site"
    result = CliRunner().invoke(app, ["report", "build", "--out", str(site)], env=env)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    for page in site.rglob("*.html"):
        assert not NAN_NUMBER.search(page.read_text(encoding="utf-8")), page
    assert not marker.exists()


def test_long_local_names_stored(tmp_path: Path, db_url: str) -> None:
    """A local folder named with 250 characters (parent too) is stored on both backends."""
    full = tmp_path / "full"
    hc.write_hub(full, tmp_path / "PAYLOAD-RAN")
    folder = tmp_path / ("o" * 250) / ("n" * 250)
    shutil.copytree(full / "hostile" / "nan-one-tensor", folder)
    env = {"AUDITOR_DATABASE_URL": db_url, "AUDITOR_DATA_DIR": str(tmp_path / "data"),
           "AUDITOR_CACHE_DIR": str(tmp_path / "cache")}
    result = CliRunner().invoke(app, ["audit", str(folder), "--base", str(full / hc.BASE_ID),
                                      "--store", "-q"], env=env)
    assert result.exit_code == 1, result.output
    engine = make_engine(db_url)
    with session_factory(engine)() as session:
        ids = [a.revision.repo.repo_id for a in session.scalars(select(Audit))]
    engine.dispose()
    assert len(ids) == 1 and ids[0].split("/")[1].startswith("nnnn")
