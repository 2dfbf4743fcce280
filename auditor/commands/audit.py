"""``auditor audit``: audit one model on demand (a Hub repo id or a local folder)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from auditor.exitcodes import ExitCode


def register(app: typer.Typer) -> None:
    @app.command()
    def audit(
        subject: Annotated[str, typer.Argument(help="Hub repo id (ORG/NAME) or local folder")],
        revision: Annotated[str | None, typer.Option(help="branch, tag or commit")] = None,
        base: Annotated[
            str | None, typer.Option(help="base model (default: the card's base_model)")
        ] = None,
        against: Annotated[
            list[str] | None, typer.Option("--against", help="candidate homologue (repeat)")
        ] = None,
        fmt: Annotated[str, typer.Option("--format", help="json, html or sarif")] = "json",
        output: Annotated[Path | None, typer.Option(help="write the report here")] = None,
        endpoint: Annotated[
            str | None, typer.Option(help="Hub endpoint (default AUDITOR_HUB_ENDPOINT)")
        ] = None,
        store: Annotated[
            bool, typer.Option("--store/--no-store", help="also record it in the database")
        ] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    ) -> None:
        """Audit SUBJECT. Exit codes: 0 clean, 1 findings, 2 errors, 3 nothing scanned."""
        from auditor.errors import AuditorError
        from auditor.orchestrator import audit_revision
        from auditor.reports.formatters import FORMATTERS, render
        from auditor.rules.engine import rule_metas
        from auditor.rules.loader import load_rules
        from auditor.settings import Settings

        if fmt not in FORMATTERS:
            typer.secho(f"error: unknown format {fmt!r} ({', '.join(FORMATTERS)})", err=True)
            raise typer.Exit(ExitCode.ERROR)
        overrides = {"hub_endpoint": endpoint} if endpoint else {}
        settings = Settings(**overrides)  # type: ignore[arg-type]
        try:
            with _progress(enabled=not quiet) as say:
                outcome = audit_revision(
                    subject,
                    revision=revision,
                    base=base,
                    against=against or (),
                    settings=settings,
                    progress=say,
                )
            if store:
                from auditor.store.recording import record_outcome

                record_outcome(settings, outcome)
            text = render(
                outcome.report, fmt=fmt, rules=rule_metas(load_rules(settings.rules_dir))
            )
        except AuditorError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(ExitCode.ERROR) from None
        if output:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(text, encoding="utf-8")
            if not quiet:
                typer.echo(f"report written to {output}", err=True)
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
        if not quiet:
            _summary(outcome.report)
        raise typer.Exit(int(outcome.exit_code))


class _progress:
    """A rich status line on a terminal; silent otherwise (pipes, CI)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._status = None

    def __enter__(self):  # type: ignore[no-untyped-def]
        if not self.enabled:
            return lambda _msg: None
        from rich.console import Console

        self._status = Console(stderr=True).status("auditing")
        self._status.__enter__()
        return lambda msg: self._status.update(msg)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)


def _summary(report) -> None:  # type: ignore[no-untyped-def]
    findings = report.active_findings
    if not findings:
        typer.echo(f"{report.subject.repo_id}: no findings", err=True)
        return
    for f in findings:
        typer.echo(f"{report.subject.repo_id}: [{f.severity}] {f.rule_id} {f.title}", err=True)
