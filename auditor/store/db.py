"""Engines, sessions and schema upgrades (Alembic, programmatically)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from auditor.errors import StoreError
from auditor.resources import resource_path
from auditor.settings import Settings

# The Alembic scripts live at the repo top in a checkout, in auditor/_shipped/ when installed.
ALEMBIC_DIR = resource_path("alembic")
ALEMBIC_INI = resource_path("alembic.ini")

SQLITE_BUSY_TIMEOUT_MS = 30_000


def default_database_url() -> str:
    """The configured URL, or a SQLite file in AUDITOR_DATA_DIR (directory created)."""
    # Read afresh, not the cached settings: tests and wrappers change the environment.
    settings = Settings()
    if settings.database_url:
        return normalize_url(settings.database_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings.resolved_database_url


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (psycopg2 is not installed)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url[len("postgres://") :]
    return url


def finite_json_dumps(value: Any) -> str:
    """JSON columns hold only finite numbers: NaN / inf become null (and never the invalid
    ``NaN`` token that PostgreSQL rejects and SQLite stores), whatever reaches the store."""
    from auditor.schema import finite_json

    return json.dumps(finite_json(value), allow_nan=False)


def _ensure_sqlite_dir(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An engine for ``url`` (default: settings). SQLite gets WAL, a busy timeout and
    foreign keys on every connection, so several processes can share the file."""
    url = normalize_url(url or default_database_url())
    backend = make_url(url).get_backend_name()
    kwargs.setdefault("json_serializer", finite_json_dumps)
    if backend == "sqlite":
        _ensure_sqlite_dir(url)
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        _install_sqlite_hooks(engine)
        return engine
    if backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)
    raise StoreError(f"unsupported database URL {make_url(url).render_as_string()!r}")


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        # Let SQLAlchemy emit BEGIN itself (see _sqlite_begin) instead of pysqlite's
        # implicit, deferred transactions, so claims can use BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front: two processes cannot both read a
        # queued audit and then both update it (no lock-upgrade deadlocks either).
        mode = conn.get_execution_options().get("sqlite_begin", "")
        conn.exec_driver_sql(f"BEGIN {mode}".strip())


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: callers read attributes of returned rows after commit.
    return sessionmaker(bind=engine, expire_on_commit=False)


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    # '%' must be escaped for configparser interpolation.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    return config


# pg_advisory_lock key of the migrations ("auditor-migrate" folded to a bigint).
_PG_MIGRATION_LOCK = 0x6175646D6967


@contextmanager
def migration_lock(url: str) -> Iterator[None]:
    """Serialize schema upgrades across processes: 8 first runs at once must not race.

    SQLite: an exclusive ``flock`` on a file next to the database (SQLite's own locking
    answers "database is locked" to the losers of the race instead of waiting for the DDL).
    PostgreSQL: a session-level ``pg_advisory_lock`` held while Alembic runs.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if not database or database == ":memory:" or database.startswith("file:"):
            yield
            return
        import fcntl

        path = Path(database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".migrate-lock"), "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    if backend == "postgresql":
        from sqlalchemy import text
        from sqlalchemy.pool import NullPool

        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"),
                                 {"k": _PG_MIGRATION_LOCK})
                    conn.commit()
        finally:
            engine.dispose()
        return
    yield


def upgrade_database(url: str | None = None, *, revision: str = "head") -> None:
    """Run Alembic migrations up to ``revision`` on ``url`` (default: settings), holding
    ``migration_lock`` so concurrent first runs wait for one another instead of failing."""
    from alembic import command

    url = normalize_url(url or default_database_url())
    if make_url(url).get_backend_name() == "sqlite":
        _ensure_sqlite_dir(url)
    with migration_lock(url):
        command.upgrade(_alembic_config(url), revision)


def downgrade_database(url: str | None = None, *, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(_alembic_config(normalize_url(url or default_database_url())), revision)


@contextmanager
def migrated_session(url: str | None = None) -> Iterator[Session]:
    """A session on ``url`` (default: the configured database), migrated to head first.

    For one-shot commands: the engine lives as long as the session.
    """
    url = normalize_url(url or default_database_url())
    upgrade_database(url)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def begin_write(session: Session) -> None:
    """Start a write transaction.

    SQLite cannot upgrade a read transaction to a write one while another process
    writes (it fails at once with "database is locked", without waiting): take the
    write lock first with BEGIN IMMEDIATE. Anything the caller left pending in the
    session is committed first (these functions commit anyway). No-op elsewhere.
    """
    if session.get_bind().dialect.name != "sqlite":
        return
    if session.in_transaction():
        session.commit()
    session.connection(execution_options={"sqlite_begin": "IMMEDIATE"})
