"""Pytest fixtures for the store area.

``db_url`` is parametrized over SQLite (a file in tmp_path) and PostgreSQL (a fresh
database with a random name, dropped afterwards, so parallel runs never clash). The
PostgreSQL case is marked ``postgres`` and skipped only if the server is unreachable.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _pg_reachable() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


def create_pg_database(*, template: str | None = None) -> str:
    """A fresh PostgreSQL database (empty, or a copy of ``template``); returns its URL."""
    name = f"auditor_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        suffix = f' TEMPLATE "{template}"' if template else ""
        conn.execute(text(f'CREATE DATABASE "{name}"{suffix}'))
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_available() -> bool:
    return _pg_reachable()


@pytest.fixture
def pg_url(pg_available: bool) -> Iterator[str]:
    """An empty PostgreSQL database for one test."""
    if not pg_available:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is unreachable")
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL, once per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'auditor.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once per session; tests get copies of it."""
    from auditor.store.db import upgrade_database

    path = tmp_path_factory.mktemp("store-template") / "template.db"
    upgrade_database(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def _pg_template(pg_available: bool) -> Iterator[str]:
    """A PostgreSQL database migrated once per session, cloned with CREATE DATABASE ...
    TEMPLATE (much faster than running the migrations for every test)."""
    if not pg_available:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is unreachable")
    from auditor.store.db import upgrade_database

    url = create_pg_database()
    try:
        upgrade_database(url)
        yield url.rsplit("/", 1)[1]
    finally:
        drop_pg_database(url)


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL already migrated to head, once per backend."""
    if request.param == "sqlite":
        path = tmp_path / "auditor.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    template = request.getfixturevalue("_pg_template")
    url = create_pg_database(template=template)
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def store_engine(store_url: str) -> Iterator[Engine]:
    """An engine on a database migrated to head."""
    from auditor.store.db import make_engine

    engine = make_engine(store_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def store_session(store_engine: Engine) -> Iterator[Session]:
    from auditor.store.db import session_factory

    with session_factory(store_engine)() as session:
        yield session
