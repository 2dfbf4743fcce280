"""The Alembic history builds exactly the models' schema and can be undone, on both backends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, inspect

from auditor.store.db import downgrade_database, make_engine, upgrade_database
from auditor.store.models import Base

TABLES = {
    "watched_bases",
    "repos",
    "revisions",
    "fingerprints",
    "fingerprint_cache",
    "audits",
    "worker_heartbeats",
    "comparisons",
    "findings",
    "crawl_cursors",
    "authorizations",
    "provenance",
    "discovery_state",
}


def _diff(url: str, metadata: MetaData = Base.metadata) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_migration_round_trip(db_url: str) -> None:
    upgrade_database(db_url)
    assert _tables(db_url) == TABLES
    assert _diff(db_url) == []
    # The comparison does see differences (an empty model would drop every table).
    removed = {d[1].name for d in _diff(db_url, MetaData()) if d[0] == "remove_table"}
    assert removed == TABLES

    downgrade_database(db_url, revision="base")
    assert _tables(db_url) == set()

    upgrade_database(db_url)
    assert _tables(db_url) == TABLES
    assert _diff(db_url) == []


def test_alembic_command_line_reads_settings(tmp_path: Path) -> None:
    """`alembic upgrade head` / `downgrade base` from the repo root use AUDITOR_DATABASE_URL."""
    root = Path(__file__).resolve().parent.parent
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "AUDITOR_DATABASE_URL": url}
    alembic = [sys.executable, "-m", "alembic", "-c", str(root / "alembic.ini")]
    subprocess.run(
        [*alembic, "upgrade", "head"], cwd=root, env=env, check=True, capture_output=True
    )
    assert _tables(url) == TABLES
    assert _diff(url) == []
    subprocess.run(
        [*alembic, "downgrade", "base"], cwd=root, env=env, check=True, capture_output=True
    )
    assert _tables(url) == set()
