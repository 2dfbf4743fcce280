"""One formatter per output format, all with the same signature (bandit-style registry).

``FORMATTERS["json" | "sarif" | "html"](report, rules=...) -> str``. Formatters are pure:
they never touch the network, the store or the file system (``render`` only dispatches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from auditor.errors import AuditorError
from auditor.schema import AuditReport, RuleMeta


class Formatter(Protocol):
    def __call__(self, report: AuditReport, *, rules: Sequence[RuleMeta] = ()) -> str: ...


class UnknownFormat(AuditorError):
    """The requested report format has no formatter."""


def _registry() -> dict[str, Formatter]:
    # Imported here so ``auditor.reports.formatters`` stays importable from each formatter.
    from auditor.reports import html, json_format, sarif

    return {
        "json": json_format.format_report,
        "sarif": sarif.format_report,
        "html": html.format_report,
    }


FORMATTERS: dict[str, Formatter] = _registry()


def render(report: AuditReport, *, fmt: str, rules: Sequence[RuleMeta] = ()) -> str:
    """Format ``report`` as ``fmt`` (one of ``FORMATTERS``)."""
    try:
        formatter = FORMATTERS[fmt]
    except KeyError:
        known = ", ".join(sorted(FORMATTERS))
        raise UnknownFormat(f"unknown report format {fmt!r} (known: {known})") from None
    return formatter(report, rules=rules)
