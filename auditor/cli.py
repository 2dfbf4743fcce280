"""The ``auditor`` command line.

Each area owns its commands in ``auditor/<area>/commands.py`` with a ``register(app)``
function; this module only assembles them. Commands from other installed packages (the
test kit's ``serve-hub``, ``zoo``, ``demo``) come through the ``auditor.commands``
entry-point group, so the product never imports them. Heavy imports (torch,
transformers) happen inside the command functions so ``auditor --help`` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import sys
from importlib.metadata import entry_points

import typer

from auditor.errors import AuditorError
from auditor.exitcodes import ExitCode

app = typer.Typer(
    name="auditor",
    help="Audit Hugging Face Hub models for merge theft and backdoored merges.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

_COMMAND_MODULES = (
    "auditor.rules.commands",
    "auditor.store.commands",
    "auditor.commands.audit",
    "auditor.daemon.commands",
    "auditor.daemon.celery_commands",
    "auditor.reports.commands",
    "auditor.commands.sanitize",
)
# Entry points whose object is a ``register(app)`` function (see pyproject.toml).
COMMAND_GROUP = "auditor.commands"


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # An area not built yet must not break the others.
            if exc.name == name:
                continue
            raise
        module.register(app)
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        ep.load()(app)


_DEBUG = {"on": False}


def debug_enabled() -> bool:
    """``auditor --debug ...``: tracebacks on stderr (crashes, detector failures)."""
    return _DEBUG["on"]


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="show tracebacks of internal errors (default: one line)"
    ),
) -> None:
    """Audit Hugging Face Hub models for merge theft and backdoored merges."""
    _DEBUG["on"] = debug
    if debug:
        logging.getLogger("auditor").setLevel(logging.DEBUG)


@app.command()
def version() -> None:
    """Print the tool and analysis versions."""
    from auditor import ANALYSIS_VERSION, __version__

    typer.echo(f"auditor {__version__} (analysis {ANALYSIS_VERSION})")


_register_all()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except AuditorError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(ExitCode.ERROR)
    except Exception as exc:
        # A bug is an error (2), never "findings" (1): one line, the traceback on --debug.
        if debug_enabled():
            import traceback

            traceback.print_exc()
        first = (str(exc).splitlines() or [""])[0][:300]
        typer.secho(f"error: internal error: {type(exc).__name__}: {first} "
                    "(run with --debug for the traceback)", err=True, fg=typer.colors.RED)
        sys.exit(ExitCode.ERROR)


if __name__ == "__main__":
    main()
