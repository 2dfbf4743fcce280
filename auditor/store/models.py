"""SQLAlchemy 2 models of the auditor's state: watched bases, repos, revisions,
fingerprints, the audit queue, comparisons, findings, crawl cursors, authorizations.

The Alembic history in ``alembic/versions`` must match these models exactly
(tests/test_migrations.py compares them), so every change here needs a migration.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Explicit constraint names: SQLite batch migrations (ALTER by table copy) and
# downgrades can only drop constraints that have a name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

AUDIT_STATUSES = ("queued", "running", "done", "failed", "skipped")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zone type and hands back naive values; comparing those with
    aware ones raises, so values are normalised to aware UTC both ways.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        # SQLite stores the text form; keep it naive so string ordering stays correct.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class WatchedBase(Base):
    """A base model whose derivatives the crawler lists."""

    __tablename__ = "watched_bases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[str] = mapped_column(String(255), unique=True)
    note: Mapped[str | None] = mapped_column(Text)
    added_at: Mapped[datetime] = mapped_column(default=utcnow)


class Repo(Base):
    __tablename__ = "repos"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[str] = mapped_column(String(255), unique=True)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    declared_base_models: Mapped[list[Any]] = mapped_column(default=list)  # the card's
    # Watched bases whose family the crawler found this repo in (at any depth): kept apart
    # from what the card declares, which a merge's card fills with its parents.
    family_bases: Mapped[list[Any] | None] = mapped_column()
    declared_relation: Mapped[str | None] = mapped_column(String(32))
    gated: Mapped[bool] = mapped_column(Boolean, default=False)
    private: Mapped[bool] = mapped_column(Boolean, default=False)
    skip_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    revisions: Mapped[list[Revision]] = relationship(back_populates="repo")


class Revision(Base):
    __tablename__ = "revisions"
    __table_args__ = (UniqueConstraint("repo_pk", "sha"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_pk: Mapped[int] = mapped_column(ForeignKey("repos.id", ondelete="CASCADE"))
    sha: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime | None] = mapped_column()
    # [{"path": ..., "size": ...}]; formats e.g. ["safetensors", "pickle"].
    files: Mapped[list[Any]] = mapped_column(default=list)
    formats: Mapped[list[Any]] = mapped_column(default=list)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)

    repo: Mapped[Repo] = relationship(back_populates="revisions")
    audits: Mapped[list[Audit]] = relationship(back_populates="revision")


class Fingerprint(Base):
    __tablename__ = "fingerprints"
    __table_args__ = (UniqueConstraint("revision_id", "analysis_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision_id: Mapped[int] = mapped_column(ForeignKey("revisions.id", ondelete="CASCADE"))
    analysis_version: Mapped[str] = mapped_column(String(32))
    # Small fingerprints live in the row; big ones may be a file path instead.
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    path: Mapped[str | None] = mapped_column(Text)
    error_bound: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CachedFingerprint(Base):
    """A model's task-vector fingerprint keyed by content: no audit reads it again.

    ``content_key`` is the revision sha (a Hub commit, or the file-hash digest of a local
    folder), ``base_key`` the base's; the base's own weight fingerprint has base_key "".
    Homologues of a base are one indexed query on ``base_key`` (never a scan of the store).
    """

    __tablename__ = "fingerprint_cache"
    __table_args__ = (
        UniqueConstraint("content_key", "base_key", "analysis_version"),
        Index("ix_fingerprint_cache_base", "base_key", "analysis_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    content_key: Mapped[str] = mapped_column(String(128))
    base_key: Mapped[str] = mapped_column(String(128))
    analysis_version: Mapped[str] = mapped_column(String(32))
    repo_id: Mapped[str] = mapped_column(String(255))
    base_repo_id: Mapped[str | None] = mapped_column(String(255))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Audit(Base):
    """One audit of one revision under one analysis version and configuration.

    The unique key makes a duplicate impossible; retries and re-queues of a failed
    audit reuse the same row, a new analysis version or config makes a new one
    (so the history is kept).
    """

    __tablename__ = "audits"
    __table_args__ = (
        UniqueConstraint("revision_id", "analysis_version", "config_hash"),
        CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed', 'skipped')", name="status"
        ),
        Index("ix_audits_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision_id: Mapped[int] = mapped_column(ForeignKey("revisions.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    tool_version: Mapped[str | None] = mapped_column(String(32))
    analysis_version: Mapped[str] = mapped_column(String(32))
    config_hash: Mapped[str] = mapped_column(String(64))
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    report: Mapped[dict[str, Any] | None] = mapped_column()
    # A first pass (weights, lineage, rules) is done and the behavioural checks wait for
    # a second one (``Settings.defer_behaviour_bytes``); such rows are claimed last.
    behaviour_pending: Mapped[bool] = mapped_column(Boolean, default=False,
                                                    server_default=false())

    revision: Mapped[Revision] = relationship(back_populates="audits")
    comparisons: Mapped[list[Comparison]] = relationship(
        back_populates="audit", cascade="all, delete-orphan"
    )
    findings: Mapped[list[FindingRow]] = relationship(
        back_populates="audit", cascade="all, delete-orphan"
    )


class Comparison(Base):
    """One pairwise comparison of the audited revision with another repo."""

    __tablename__ = "comparisons"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    audit_id: Mapped[int] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), index=True)
    other_repo_id: Mapped[str] = mapped_column(String(255), index=True)
    other_revision: Mapped[str | None] = mapped_column(String(64))
    relation: Mapped[str] = mapped_column(String(32))
    cosine: Mapped[float | None] = mapped_column(Float)
    p_value: Mapped[float | None] = mapped_column(Float)
    coefficient: Mapped[float | None] = mapped_column(Float)
    barrier: Mapped[float | None] = mapped_column(Float)
    barrier_curve: Mapped[dict[str, Any] | None] = mapped_column()

    audit: Mapped[Audit] = relationship(back_populates="comparisons")


class FindingRow(Base):
    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    audit_id: Mapped[int] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), index=True)
    rule_id: Mapped[str] = mapped_column(String(32), index=True)
    severity: Mapped[str] = mapped_column(String(16))
    confidence: Mapped[str] = mapped_column(String(16))
    title: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    subject_repo: Mapped[str] = mapped_column(String(255), index=True)
    related_repo: Mapped[str | None] = mapped_column(String(255), index=True)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    suppressed: Mapped[bool] = mapped_column(Boolean, default=False)
    suppressed_reason: Mapped[str | None] = mapped_column(Text)

    audit: Mapped[Audit] = relationship(back_populates="findings")


class CrawlCursor(Base):
    """Where the crawl of one base's derivatives stopped, and how it last went."""

    __tablename__ = "crawl_cursors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_repo_id: Mapped[str] = mapped_column(String(255), unique=True)
    last_created_at: Mapped[datetime | None] = mapped_column()
    last_sha: Mapped[str | None] = mapped_column(String(64))
    last_success_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None] = mapped_column()


class Authorization(Base):
    """``owner`` allowed ``subject`` (a repo id or an fnmatch pattern) to merge their
    models, or only ``related_repo`` when it is set; matching findings are suppressed."""

    __tablename__ = "authorizations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    subject: Mapped[str] = mapped_column(String(255))
    related_repo: Mapped[str | None] = mapped_column(String(255))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Provenance(Base):
    """How a derivative of a watched base was found: ``declared`` (its card names the
    base), ``family_tree`` (a child of a known derivative) or ``discovered`` (its weights,
    whatever its card says). One row per way; ``evidence`` holds the shape match, the
    weight probe, the screening and the card's claims."""

    __tablename__ = "provenance"
    __table_args__ = (UniqueConstraint("repo_id", "base_repo_id", "found_by"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[str] = mapped_column(String(255), index=True)
    base_repo_id: Mapped[str] = mapped_column(String(255), index=True)
    found_by: Mapped[str] = mapped_column(String(16))
    sha: Mapped[str | None] = mapped_column(String(64))
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class DiscoveryState(Base):
    """Per watched base: how far back the weight-based discovery has listed new uploads,
    and where the bounded family-tree walk stopped (it resumes there next crawl)."""

    __tablename__ = "discovery_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_repo_id: Mapped[str] = mapped_column(String(255), unique=True)
    listed_until: Mapped[datetime | None] = mapped_column()
    tree_resume: Mapped[str | None] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WorkerHeartbeat(Base):
    """A worker process seen by the store: Celery workers on any machine write one row
    each and refresh ``last_seen_at`` (``auditor status`` lists the recent ones)."""

    __tablename__ = "worker_heartbeats"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(128), unique=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[Any]] = mapped_column(default=list)
    device: Mapped[str] = mapped_column(String(32), default="cpu")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    current_audit_id: Mapped[int | None] = mapped_column(Integer)
    audits_done: Mapped[int] = mapped_column(Integer, default=0)
    audits_failed: Mapped[int] = mapped_column(Integer, default=0)
    stopped_at: Mapped[datetime | None] = mapped_column()
