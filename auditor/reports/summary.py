"""What a reader should see first: the verdict of an audit, shared by every HTML page."""

from __future__ import annotations

import re
from dataclasses import dataclass

from auditor.schema import AuditReport, Finding, Severity


@dataclass(frozen=True)
class Verdict:
    text: str
    severity: Severity | None  # None: clean, or incomplete (nothing could be concluded)
    detail: str = ""
    incomplete: bool = False  # something could not be checked: never shown as clean

    @property
    def css(self) -> str:
        if self.severity:
            return self.severity.value
        return "incomplete" if self.incomplete else "clean"


# An absolute path (cache folders, snapshot dirs): pages show its last part only, so the
# site never publishes the auditor's file system layout.
_ABS_PATH = re.compile(r"(?<![\w.])(?:/[^/\s'\"():,;<>]+)+/([^/\s'\"():,;<>]+)")


def public_text(text: str) -> str:
    """``text`` with absolute file paths cut to their file name."""
    return _ABS_PATH.sub(r"\1", text)


def sorted_findings(findings: list[Finding]) -> list[Finding]:
    """Most severe first; stable otherwise so the rule engine's order is kept."""
    return sorted(findings, key=lambda f: -f.severity.rank)


def verdict(report: AuditReport) -> Verdict:
    active = sorted_findings(report.active_findings)
    authorized = len(report.findings) - len(report.active_findings)
    if active:
        top = active[0]
        more = len(active) - 1
        detail = f"and {more} more finding{'s' if more != 1 else ''}" if more else ""
        return Verdict(f"{top.title} ({top.severity.value})", top.severity, detail)
    if report.errors:
        return Verdict("Incomplete audit", None,
                       public_text("; ".join(f"{e.detector}: {e.message}"
                                             for e in report.errors[:3])), incomplete=True)
    plural = "s" if authorized != 1 else ""
    detail = f"{authorized} authorized finding{plural}" if authorized else ""
    return Verdict("Clean", None, detail)


def severity_counts(reports: list[AuditReport]) -> dict[str, int]:
    """Active findings per severity, most severe first (zeros kept, for a stable layout)."""
    counts = {s.value: 0 for s in sorted(Severity, key=lambda s: -s.rank)}
    for r in reports:
        for f in r.active_findings:
            counts[f.severity.value] += 1
    return counts
