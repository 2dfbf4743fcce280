"""``auditor zoo build DIR [--spec small|lineage|demo] [--seed N]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

zoo_app = typer.Typer(help="Build zoos of tiny related models (tests, benchmarks, demo).")


@zoo_app.command("build")
def build(
    directory: Annotated[
        Path, typer.Argument(help="Root folder; repos go to DIR/<org>/<name>/.")
    ],
    spec: Annotated[str, typer.Option("--spec", help="small | lineage | demo")] = "small",
    seed: Annotated[int, typer.Option("--seed", help="Seed for every training run.")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if zoo.json matches.")
    ] = False,
) -> None:
    """Train and save a zoo with its ground truth in DIR/zoo.json (reused when present)."""
    from auditor_testkit.factory.zoo import ZOO_SPECS, build_zoo

    if spec not in ZOO_SPECS:
        raise typer.BadParameter(f"spec must be one of {', '.join(ZOO_SPECS)}")
    manifest = build_zoo(
        directory, spec=spec, seed=seed, force=force,
        progress=lambda msg: typer.echo(msg, err=True),
    )
    published = manifest.published()
    typer.echo(
        f"zoo {manifest.spec} (seed {manifest.seed}): {len(published)} repos in {directory}, "
        f"ground truth in {directory / 'zoo.json'} (built in {manifest.build_seconds:.1f} s)"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(zoo_app, name="zoo")
