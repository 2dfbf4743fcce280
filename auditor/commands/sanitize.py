"""``auditor sanitize``: average a (possibly backdoored) model with benign homologues."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _local(spec: str) -> object:
    """A local folder as is; a Hub repo id downloaded (pinned to its commit) first."""
    from auditor.analysis.sanitize import ModelRef
    from auditor.detectors.context import fetch_model
    from auditor.hub.client import HubClient
    from auditor.settings import get_settings

    if Path(spec).expanduser().is_dir():
        return Path(spec).expanduser()
    client = HubClient.from_settings(get_settings())
    resolved = client.resolve(spec)
    model = fetch_model(client, resolved)
    return ModelRef(path=model.folder, repo_id=resolved.repo_id, revision=resolved.revision)


def register(app: typer.Typer) -> None:
    @app.command("sanitize")
    def sanitize_cmd(
        subject: Annotated[str, typer.Argument(
            help="Hub repo id or folder of the (possibly backdoored) model.")],
        homologues: Annotated[list[str], typer.Option(
            "--with", help="Benign homologue: Hub repo id or folder (repeat).")],
        output: Annotated[Path, typer.Option("--output", help="Folder to write the result to.")],
        weight: Annotated[list[float] | None, typer.Option(
            "--weight", help="One weight per model (default uniform).")] = None,
        base: Annotated[str | None, typer.Option(
            "--base", help="Base repo id or folder: find the triggers.")] = None,
        trigger: Annotated[str | None, typer.Option("--trigger", help="Known trigger.")] = None,
        forced: Annotated[str | None, typer.Option(
            "--forced-output", help="The trigger's forced output.")] = None,
    ) -> None:
        """Average SUBJECT with benign homologues ("Here's a Free Lunch") into OUTPUT."""
        from auditor.analysis.sanitize import sanitize
        from auditor.schema import Trigger

        trigs = None
        if trigger:
            trigs = [Trigger(text=trigger, attack_success_rate=0.0, forced_output=forced)]
        res = sanitize(_local(subject), [_local(h) for h in homologues], output_dir=output,
                       weights=weight or None, triggers=trigs,
                       base=_local(base) if base else None)

        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        typer.echo(f"wrote {res.tensors_written} tensors to {res.output_dir}")
        typer.echo(f"trigger: {res.trigger or 'none'}  ASR {fmt(res.asr_before)} -> "
                   f"{fmt(res.asr_after)}  probe loss {fmt(res.loss_before)} -> "
                   f"{fmt(res.loss_after)}")
