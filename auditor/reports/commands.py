"""``auditor report build`` (the static site) and ``auditor report render`` (one report)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from auditor.schema import RuleMeta

_RulesOpt = Annotated[
    Path | None,
    typer.Option("--rules", help="Rules directory or file (default: AUDITOR_RULES_DIR or rules/)."),
]


def _rule_metas(path: Path | None) -> list[RuleMeta]:
    """Rule metadata for SARIF descriptors and remediation texts; none if no rules exist."""
    from auditor.errors import RuleError
    from auditor.rules.engine import rule_metas
    from auditor.rules.loader import load_rules

    try:
        return rule_metas(load_rules(path))
    except RuleError:
        if path is not None:
            raise  # the user named a rules path: a broken one is an error
        return []  # no shipped rules (yet): findings still carry their own texts


def register(app: typer.Typer) -> None:
    report_app = typer.Typer(help="Reports: JSON, SARIF, HTML and the static site.",
                             no_args_is_help=True)

    @report_app.command("build")
    def build(
        out: Annotated[Path, typer.Option("--output", "-o", "--out",
                                          help="Directory to write the site into.")],
        rules: _RulesOpt = None,
        site_url: Annotated[str | None, typer.Option(
            help="The site's public URL, for absolute links in the Atom feeds.")] = None,
    ) -> None:
        """Build the static HTML site from the store (works offline, from file://)."""
        from auditor.reports.from_store import site_data_from_store
        from auditor.reports.site import build_site
        from auditor.settings import Settings
        from auditor.store.db import migrated_session

        with migrated_session() as session:
            data = site_data_from_store(session, hub_url=Settings().hub_endpoint,
                                        site_url=site_url)
        written = build_site(out, data, rules=_rule_metas(rules))
        typer.echo(f"wrote {len(written)} files to {out} (open {out / 'index.html'})")

    @report_app.command("render")
    def render_cmd(
        report_file: Annotated[Path, typer.Argument(help="An audit report in JSON.")],
        fmt: Annotated[str, typer.Option("--format", "-f", help="json, sarif or html.")] = "sarif",
        out: Annotated[Path | None, typer.Option("--output", "-o", "--out",
                                                 help="File (default stdout).")]
        = None,
        rules: _RulesOpt = None,
    ) -> None:
        """Convert a JSON audit report to SARIF or a standalone HTML page."""
        from auditor.errors import AuditorError
        from auditor.reports.formatters import render
        from auditor.schema import AuditReport

        try:
            report = AuditReport.model_validate_json(report_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise AuditorError(f"{report_file}: not a readable audit report ({exc})") from exc
        text = render(report, fmt=fmt, rules=_rule_metas(rules))
        if out is None:
            typer.echo(text, nl=False)
        else:
            out.write_text(text, encoding="utf-8")
            typer.echo(f"wrote {out}")

    app.add_typer(report_app, name="report")
