"""``auditor rules list`` and ``auditor rules test``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_RulesDir = Annotated[
    Path | None,
    typer.Option("--rules", help="Rules directory or file (default: AUDITOR_RULES_DIR or rules/)."),
]


def register(app: typer.Typer) -> None:
    rules_app = typer.Typer(
        help="The YAML rules that turn measurements into findings.", no_args_is_help=True
    )

    @rules_app.command("list")
    def rules_list(rules: _RulesDir = None) -> None:
        """Show every rule: id, severity, title."""
        from rich.console import Console
        from rich.table import Table

        from auditor.rules.loader import load_rules

        loaded = load_rules(rules)
        table = Table("id", "severity", "scope", "title")
        for rule in loaded:
            table.add_row(rule.id, str(rule.spec.severity), rule.spec.scope, rule.spec.title)
        Console(width=120).print(table)

    @rules_app.command("test")
    def rules_test(rules: _RulesDir = None) -> None:
        """Run every rule's examples; exits non-zero if one fails."""
        from auditor.exitcodes import ExitCode
        from auditor.rules.engine import run_examples
        from auditor.rules.loader import load_rules

        loaded = load_rules(rules)
        count, failures = run_examples(loaded)
        for failure in failures:
            typer.secho(f"FAIL {failure}", err=True, fg=typer.colors.RED)
        if failures:
            typer.echo(f"{len(failures)} of {count} examples failed in {len(loaded)} rules")
            raise typer.Exit(ExitCode.FINDINGS)
        typer.echo(f"{count} examples of {len(loaded)} rules passed")

    app.add_typer(rules_app, name="rules")
