"""``auditor db upgrade``, ``auditor authorize OWNER SUBJECT``, ``auditor authorizations``
and ``auditor unauthorize ID``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    pass


def register(app: typer.Typer) -> None:
    db_app = typer.Typer(help="The auditor's database.", no_args_is_help=True)

    @db_app.command("upgrade")
    def db_upgrade(
        url: Annotated[
            str | None,
            typer.Option(help="Database URL (default: AUDITOR_DATABASE_URL or SQLite file)."),
        ] = None,
        revision: Annotated[str, typer.Option(help="Alembic revision to reach.")] = "head",
    ) -> None:
        """Create or migrate the database schema."""
        from auditor.store.db import default_database_url, upgrade_database

        target = url or default_database_url()
        upgrade_database(target, revision=revision)
        typer.echo(f"database at {revision}")

    @app.command("authorize")
    def authorize_add(
        owner: Annotated[str, typer.Argument(help="The owner granting the permission.")],
        subject: Annotated[
            str, typer.Argument(help="Repo allowed to use the owner's models (fnmatch pattern ok).")
        ],
        related: Annotated[
            str | None, typer.Option("--related", help="Only this repo of the owner.")
        ] = None,
        note: Annotated[str | None, typer.Option(help="Why (shown in reports).")] = None,
        reevaluate: _ReevalOpt = True,
    ) -> None:
        """OWNER allows SUBJECT to merge or copy their models (findings get suppressed)."""
        from auditor.store import policy

        with _session() as session:
            row = policy.add_authorization(
                session, owner=owner, subject=subject, related_repo=related, note=note
            )
            typer.echo(
                f"authorization {row.id}: {owner} -> {subject}"
                + (f" (only {related})" if related else "")
            )
            if reevaluate:
                _report_reevaluation(session)

    @app.command("authorizations")
    def authorize_list(
        owner: Annotated[str | None, typer.Option(help="Only this owner's grants.")] = None,
    ) -> None:
        """List the authorizations."""
        from rich.console import Console
        from rich.table import Table

        from auditor.store import policy

        with _session() as session:
            rows = policy.list_authorizations(session, owner=owner)
        table = Table("id", "owner", "subject", "related", "note", "created")
        for r in rows:
            table.add_row(
                str(r.id),
                r.owner,
                r.subject,
                r.related_repo or "*",
                r.note or "",
                r.created_at.isoformat(timespec="seconds"),
            )
        Console().print(table)

    @app.command("unauthorize")
    def authorize_remove(authorization_id: int, reevaluate: _ReevalOpt = True) -> None:
        """Remove an authorization by id."""
        from auditor.errors import StoreError
        from auditor.store import policy

        with _session() as session:
            if not policy.remove_authorization(session, authorization_id=authorization_id):
                raise StoreError(f"no authorization with id {authorization_id}")
            typer.echo(f"authorization {authorization_id} removed")
            if reevaluate:
                _report_reevaluation(session)

    @app.command("reevaluate")
    def reevaluate_cmd() -> None:
        """Apply the current authorizations to every stored finding (none is deleted)."""
        with _session() as session:
            _report_reevaluation(session)

    app.add_typer(db_app, name="db")


_ReevalOpt = Annotated[bool, typer.Option(
    "--reevaluate/--no-reevaluate",
    help="Re-apply the authorizations to the stored findings now (`auditor reevaluate`).")]


def _report_reevaluation(session) -> None:  # type: ignore[no-untyped-def]
    from auditor.store.authorizations import reevaluate_stored

    r = reevaluate_stored(session)
    typer.echo(f"re-evaluated {r.audits} audits: {r.changed} changed; findings now "
               f"{r.active} active, {r.suppressed} authorized (kept, not deleted)")


def _session():  # type: ignore[no-untyped-def]
    from auditor.store.db import migrated_session

    return migrated_session()
