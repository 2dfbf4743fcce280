"""What ``auditor audit`` tells a person on a terminal, and the scanner conventions.

- ``--fail-on SEVERITY``: findings at or above it make exit code 1; info never does.
- an error names what failed and how to fix it (the endpoint, the revision, ``--base``);
- a report is still written on error, with the error in it (``error_report``);
- the human summary says what was compared, against how many candidates, the verdict and
  the top findings with their owner and coefficient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from auditor import ANALYSIS_VERSION, __version__
from auditor.errors import (
    AuditorError,
    GatedRepo,
    HubError,
    MissingBase,
    NoWeights,
    RateLimited,
    RepoNotFound,
    RevisionNotFound,
    TransientHubError,
)
from auditor.exitcodes import ExitCode
from auditor.reports.summary import sorted_findings, verdict
from auditor.rules.authz import owner_of
from auditor.schema import (
    AuditReport,
    BackdoorInfo,
    CheckError,
    MergeInfo,
    ProtectionInfo,
    Severity,
    SubjectRef,
)

if TYPE_CHECKING:
    from auditor.schema import Finding

# "never": report only. Info is not a choice: an informational finding never fails a run.
FAIL_ON_CHOICES = ("low", "medium", "high", "critical", "never")
DEFAULT_FAIL_ON = "low"
TOP_FINDINGS = 5


def failing_findings(report: AuditReport, fail_on: str) -> list[Finding]:
    """Active findings at or above ``fail_on`` (never an info finding)."""
    if fail_on == "never":
        return []
    threshold = max(Severity(fail_on).rank, Severity.LOW.rank)
    return [f for f in report.active_findings if f.severity.rank >= threshold]


def exit_code(report: AuditReport, *, scanned: bool, fail_on: str = DEFAULT_FAIL_ON) -> ExitCode:
    """1 when a finding reaches the threshold; otherwise 3 nothing scanned, 2 errors, 0."""
    if failing_findings(report, fail_on):
        return ExitCode.FINDINGS
    if not scanned:
        return ExitCode.NOTHING_SCANNED
    if report.errors:
        return ExitCode.ERROR
    return ExitCode.CLEAN


def explain_error(exc: BaseException, *, subject: str, revision: str | None,
                  base: str | None, endpoint: str) -> str:
    """The error with what to do about it, in one or two lines."""
    text = str(exc)
    if isinstance(exc, RevisionNotFound):
        rev = f"revision {revision!r}" if revision else "the default revision"
        return (f"{subject}: {rev} not found ({text}). "
                "Pass an existing branch, tag or commit SHA with --revision.")
    if isinstance(exc, MissingBase):
        return f"{text}. Pass --base ORG/NAME (a Hub repo id or a local folder)."
    if isinstance(exc, GatedRepo):
        return (f"{text}. Accept the model's terms on the Hub and give a token with read "
                "access (HF_TOKEN, `hf auth login` or AUDITOR_HUB_TOKEN).")
    if isinstance(exc, RepoNotFound):
        return (f"{text}. Check the repo id and the endpoint ({endpoint}); a private repo "
                "needs a token (HF_TOKEN, `hf auth login` or AUDITOR_HUB_TOKEN).")
    if isinstance(exc, RateLimited):
        return f"{text}. The Hub rate-limited us at {endpoint}: retry later or use a token."
    if isinstance(exc, TransientHubError | HubError):
        hint = "" if base else " If the card names a base that cannot be reached, pass --base."
        return (f"{text}. Could not talk to the Hub at {endpoint}: check --endpoint "
                f"(HF_ENDPOINT / AUDITOR_HUB_ENDPOINT) and the network.{hint}")
    if isinstance(exc, NoWeights):
        return f"{text}. Nothing to audit: publish safetensors weights."
    if isinstance(exc, AuditorError):
        return text
    return f"{type(exc).__name__}: {text}"


def error_report(*, subject: str, revision: str | None, message: str,
                 kind: str = "error") -> AuditReport:
    """A report for an audit that could not run: no findings, the error in ``errors``
    (detector "audit": it failed before any detector ran; ``kind``: the error's type)."""
    return AuditReport(
        tool_version=__version__, analysis_version=ANALYSIS_VERSION,
        subject=SubjectRef(repo_id=subject, revision=revision or "", owner=owner_of(subject)),
        lineage=[], merge=MergeInfo(is_merge=False), backdoor=BackdoorInfo(suspected=False),
        protection=ProtectionInfo(), findings=[],
        errors=[CheckError(detector="audit", kind=kind, message=message)],
    )


def _finding_line(f: Finding, report: AuditReport) -> str:
    parts = [f"[{f.severity.value}] {f.rule_id} {f.title}"]
    if f.related_repo:
        entry = next((e for e in report.lineage if e.repo_id == f.related_repo), None)
        extra = f"{f.related_repo} (owner {owner_of(f.related_repo)}"
        if entry is not None and entry.coefficient is not None:
            extra += f", coefficient {entry.coefficient:.2f}"
        parts.append(extra + ")")
    return " — ".join(parts)


def human_summary(report: AuditReport, *, candidates: int, homologues: int, scanned: bool,
                  code: ExitCode, fail_on: str) -> str:
    """A few lines for a person: compared what with what, verdict, top findings, exit."""
    s = report.subject
    rev = f"@{s.revision[:10]}" if s.revision else ""
    lines = [f"audited {s.repo_id}{rev}"]
    if not scanned:
        lines.append("nothing scanned: no safetensors, adapter or pickle files were found")
    else:
        base = s.base_repo_id or "no base"
        compared = candidates + homologues
        lines.append(f"compared with base {base} and {compared} candidate"
                     f"{'s' if compared != 1 else ''} ({candidates} downloaded with --against, "
                     f"{homologues} known from the store)")
        if compared == 0:
            lines.append("  no candidates: a merge or copy of another model cannot be seen; "
                         "pass --against ORG/NAME (repeatable) or audit with a store that "
                         "holds the base's other derivatives (auditor crawl)")
    v = verdict(report)
    if not scanned:
        lines.append("verdict: nothing scanned")
    elif v.severity is None and not report.errors and candidates + homologues == 0:
        lines.append("verdict: no findings, but not checked for merges or copies of other "
                     "models (no candidates)")
    else:
        lines.append(f"verdict: {v.text}" + (f" ({v.detail})" if v.detail else ""))
    active = sorted_findings(report.active_findings)
    for f in active[:TOP_FINDINGS]:
        lines.append("  " + _finding_line(f, report))
    if len(active) > TOP_FINDINGS:
        lines.append(f"  ... and {len(active) - TOP_FINDINGS} more (--format json for all)")
    authorized = len(report.findings) - len(active)
    if authorized:
        lines.append(f"  {authorized} finding{'s' if authorized != 1 else ''} authorized by "
                     "the owner (kept in the report)")
    if report.mergekit is not None and report.mergekit.confirmed:
        lines.append("mergekit_config.yml: confirmed by the weights")
    for err in report.errors:
        lines.append(f"incomplete: {err.detector}: {err.message}")
    for skip in report.skipped:
        lines.append(f"not run: {skip.detector}: {skip.reason}")
    failing = "never" if fail_on == "never" else f"{fail_on} and above"
    lines.append(f"exit {int(code)} ({code.name.lower().replace('_', ' ')}; fails on "
                 f"{failing}, --fail-on to change)")
    return "\n".join(lines) + "\n"
