"""``auditor serve-hub``: run the local Hub-compatible server over a folder of repos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("serve-hub")(serve_hub)


def serve_hub(
    root: Annotated[Path, typer.Argument(help="Folder holding ORG/NAME repo folders.",
                                         exists=True, file_okay=False, dir_okay=True)],
    host: Annotated[str, typer.Option(help="Interface to bind (keep it loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[list[str] | None, typer.Option(
        "--token", help="A token accepted for gated/private repos (repeatable).")] = None,
    fault_429: Annotated[float, typer.Option(
        "--fault-429", help="Share of downloads answered 429.")] = 0.0,
    fault_5xx: Annotated[float, typer.Option(
        "--fault-5xx", help="Share of downloads answered 5xx.")] = 0.0,
    fault_cut: Annotated[float, typer.Option(
        "--fault-cut", help="Share of downloads cut mid-body.")] = 0.0,
    page_size: Annotated[int, typer.Option(help="Items per /api/models page.")] = 50,
    ignore_range: Annotated[bool, typer.Option(
        "--ignore-range", help="Answer every GET 200 with the whole body, like a mirror that "
        "ignores Range.")] = False,
) -> None:
    """Serve ROOT/<org>/<name> folders (or git repos) with the Hugging Face Hub API."""
    from auditor_testkit.hub.server import FaultConfig, serve_forever

    for rate in (fault_429, fault_5xx, fault_cut):
        if not 0.0 <= rate <= 1.0:
            raise typer.BadParameter("fault rates must be between 0 and 1")
    faults = None
    if fault_429 or fault_5xx or fault_cut:
        faults = FaultConfig(rate_429=fault_429, rate_5xx=fault_5xx, rate_cut=fault_cut)
    serve_forever(root, host=host, port=port, tokens=tuple(token or ()), faults=faults,
                  page_size=page_size, ignore_range=ignore_range)
