"""``auditor audit``: audit one model on demand (a Hub repo id or a local folder).

Scanner conventions: ``--fail-on`` sets the severity that fails the run (info never
does); an error names what failed and how to fix it, even with ``-q``; a report is
written on error too; on a terminal a human summary is the default output.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from auditor.exitcodes import ExitCode

FORMAT_CHOICES = ("text", "json", "sarif", "html")


def register(app: typer.Typer) -> None:
    @app.command()
    def audit(
        subject: Annotated[str, typer.Argument(
            help="Hub repo id (ORG/NAME), or a local folder (./DIR, /DIR or --local)")],
        revision: Annotated[str | None, typer.Option(help="branch, tag or commit")] = None,
        base: Annotated[
            str | None, typer.Option(help="base model (default: the card's base_model)")
        ] = None,
        against: Annotated[
            list[str] | None, typer.Option("--against", help="candidate homologue (repeat)")
        ] = None,
        fmt: Annotated[str | None, typer.Option(
            "--format", "-f",
            help="text (a summary; the default on a terminal), json (the default otherwise), "
                 "sarif or html")] = None,
        output: Annotated[Path | None, typer.Option(
            "--output", "-o", "--out", help="write the report here (also on error)")] = None,
        endpoint: Annotated[
            str | None, typer.Option(help="Hub endpoint (default AUDITOR_HUB_ENDPOINT, "
                                          "HF_ENDPOINT, https://huggingface.co)")
        ] = None,
        store: Annotated[
            bool, typer.Option("--store/--no-store", help="also record it in the database")
        ] = False,
        stored: Annotated[
            bool, typer.Option("--stored/--no-stored",
                               help="also compare against the stored homologues of the base "
                                    "(the store's and the fingerprint cache's)")
        ] = True,
        fail_on: Annotated[str, typer.Option(
            "--fail-on", help="lowest severity that makes exit code 1: low, medium, high, "
                              "critical or never (info findings never fail)")] = "low",
        quiet: Annotated[bool, typer.Option(
            "--quiet", "-q", help="no progress and no summary; errors are still shown")] = False,
        local: Annotated[bool, typer.Option(
            "--local", help="SUBJECT is a local folder (./DIR and /DIR are, without it)")
        ] = False,
    ) -> None:
        """Audit SUBJECT. Exit codes: 0 clean, 1 findings at --fail-on or above, 2 error or
        incomplete, 3 nothing scanned."""
        from auditor.reports.terminal import FAIL_ON_CHOICES

        if fmt is not None and fmt not in FORMAT_CHOICES:
            _fail(f"unknown format {fmt!r} (choose {', '.join(FORMAT_CHOICES)})")
        if fail_on not in FAIL_ON_CHOICES:
            _fail(f"unknown --fail-on {fail_on!r} (choose {', '.join(FAIL_ON_CHOICES)}; "
                  "info findings never fail a run)")
        if fmt is None:
            fmt = "text" if output is None and sys.stdout.isatty() else "json"
        _run_audit(subject, revision=revision, base=base, against=list(against or ()),
                   fmt=fmt, output=output, endpoint=endpoint, store=store,
                   fail_on=fail_on, quiet=quiet, local=True if local else None,
                   stored=stored)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(ExitCode.ERROR)


def _run_audit(subject: str, *, revision: str | None, base: str | None, against: list[str],
               fmt: str, output: Path | None, endpoint: str | None, store: bool,
               fail_on: str, quiet: bool, local: bool | None = None,
               stored: bool = True) -> None:
    import httpx

    from auditor.audit_store import load_store_context
    from auditor.errors import AuditorError
    from auditor.hub.client import HubClient
    from auditor.orchestrator import _choose_base, audit_revision, incomplete
    from auditor.reports import terminal
    from auditor.settings import Settings
    from auditor.weights.inventory import classify_files

    overrides: dict[str, object] = {"hub_endpoint": endpoint} if endpoint else {}
    if not stored:
        overrides["compare_stored"] = False
    settings = Settings(**overrides)  # type: ignore[arg-type]
    client = HubClient.from_settings(settings)
    step = subject
    try:
        with _progress(enabled=not quiet) as say:
            # Everything the user named is checked before any download.
            say(f"resolving {subject}")
            # A repo id stays a repo id: a local folder only as ./DIR, /DIR or --local.
            resolved = client.resolve(subject, revision=revision, local=local)
            for spec in against:
                step = f"--against {spec}"
                client.resolve(spec)
            step = subject
            chosen_base, _ = _choose_base(client, resolved, base)
            known = load_store_context(settings, base_repo_id=chosen_base,
                                       subject_repo_id=resolved.repo_id)
            if not stored:
                known.homologues = {}
            outcome = audit_revision(
                subject, revision=revision, base=base, against=against,
                homologues=known.homologues, authorizations=known.authorizations,
                settings=settings, client=client, progress=say, local=local,
            )
        if store:
            from auditor.store.recording import record_outcome

            record_outcome(settings, outcome)
    except (AuditorError, httpx.HTTPError, OSError) as exc:
        message = terminal.explain_error(exc, subject=subject, revision=revision, base=base,
                                         endpoint=client.endpoint)
        if step != subject:
            message = f"{step}: {message}"
        report = terminal.error_report(subject=subject, revision=revision, message=message,
                                       kind=type(exc).__name__)
        _emit(report, fmt="json" if fmt == "text" else fmt, output=output, quiet=quiet,
              to_stdout=False)
        typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
        raise typer.Exit(ExitCode.ERROR) from None

    report = outcome.report
    inv = classify_files(outcome.resolved.files)
    scanned = inv.has_weights or bool(inv.pickles)
    code = terminal.exit_code(report, scanned=scanned, fail_on=fail_on)
    if code == ExitCode.CLEAN and incomplete(report):
        # no findings after comparing against nothing is not a clean result
        code = ExitCode.ERROR
    # homologues: the store's and the fingerprint cache's (the report counts what lineage
    # compared)
    compared = report.coverage.get("candidates_compared")
    homologues = (max(0, compared - len(against)) if compared is not None
                  else len(known.homologues))
    summary = terminal.human_summary(report, candidates=len(against),
                                     homologues=homologues, scanned=scanned,
                                     code=code, fail_on=fail_on)
    if fmt == "text":
        if output is not None:
            _emit(report, fmt="json", output=output, quiet=quiet, to_stdout=False)
        sys.stdout.write(summary)
    else:
        _emit(report, fmt=fmt, output=output, quiet=quiet, to_stdout=True)
        if not quiet:
            typer.echo(summary, err=True, nl=False)
    raise typer.Exit(int(code))


def _emit(report, *, fmt: str, output: Path | None, quiet: bool, to_stdout: bool) -> None:  # type: ignore[no-untyped-def]
    """Write ``report`` as ``fmt`` to ``output`` (or stdout when ``to_stdout``)."""
    from auditor.reports.formatters import render
    from auditor.rules.engine import rule_metas
    from auditor.rules.loader import load_rules

    try:
        metas = rule_metas(load_rules())
    except Exception:  # a broken rules dir must not hide the report itself
        metas = []
    text = render(report, fmt=fmt, rules=metas)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        if not quiet:
            typer.echo(f"report written to {output}", err=True)
    elif to_stdout:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


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
