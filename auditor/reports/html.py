"""HTML rendering: one Jinja2 environment, autoescape on for every template.

Everything shown (repo ids, model-card values, finding messages, evidence, trigger texts) may
be attacker-written. Three layers keep it inert: Jinja autoescape, SVG charts that escape
their own text (``charts.py``), and a Content-Security-Policy meta tag that forbids every
script and every external load, so even a missed escape could not run or phone home.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from auditor.reports import charts, evidence
from auditor.reports.summary import public_text, sorted_findings, verdict
from auditor.resources import resource_path
from auditor.schema import AuditReport, Finding, LineageEntry, RuleMeta

TEMPLATE_DIR = resource_path("templates")
# No script source at all; styles only inline; images only data: URIs; no <base>, no forms.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'"
)

LinkFor = Callable[[str], str | None]


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if not math.isfinite(value):
            return "n/a"
        if isinstance(value, int):
            return str(value)
        if value != 0 and abs(value) < 10 ** -digits:
            # "6.9e-11" reads as a measurement; it is zero within the estimate.
            return "≈ 0"
        text = f"{value:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value)


def _pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value * 100:.0f}%"


def _evidence_value(value: Any) -> str:
    """Scalars as text, structures as compact JSON (escaped later by autoescape)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return _num(value, 4)
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _is_http(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The shared environment (autoescape for every template, undefined names are errors)."""
    if not TEMPLATE_DIR.is_dir():
        raise FileNotFoundError(f"report templates not found in {TEMPLATE_DIR}")
    env = Environment(
        loader=FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals["CSP"] = CSP
    env.filters["num"] = _num
    env.filters["public"] = public_text
    env.filters["pct"] = _pct
    env.filters["evidence"] = _evidence_value
    env.filters["evidence_rows"] = evidence.evidence_rows
    env.filters["pvalue"] = evidence.p_text
    env.filters["urlpath"] = lambda repo: quote(str(repo), safe="/")
    env.tests["needs_legend"] = evidence.needs_legend
    env.tests["http_url"] = _is_http
    return env


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _remediation(finding: Finding, rules: dict[str, RuleMeta]) -> str:
    if finding.remediation:
        return finding.remediation
    rule = rules.get(finding.rule_id)
    return rule.remediation if rule else ""


def _lineage_status(entry: LineageEntry) -> str:
    if entry.relation == "unrelated":
        return "unrelated"
    if entry.declared:
        return "declared"
    return "undeclared" if entry.relation in ("merge_parent", "finetune_parent", "clone") \
        else "related"


def _related_owners(report: AuditReport) -> list[dict[str, Any]]:
    """Owners of the repos the findings point at: who can authorize or object."""
    owners: dict[str, list[str]] = {}
    for f in report.findings:
        if f.related_repo and "/" in f.related_repo:
            repos = owners.setdefault(f.related_repo.split("/", 1)[0], [])
            if f.related_repo not in repos:
                repos.append(f.related_repo)
    return [{"owner": o, "repos": r} for o, r in sorted(owners.items())]


def model_context(
    report: AuditReport,
    *,
    rules: Sequence[RuleMeta] = (),
    link_for: LinkFor | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything ``model.j2`` shows for one audit, charts already rendered to SVG."""
    rule_map = {r.id: r for r in rules}
    link = link_for or (lambda _repo: None)
    lineage = sorted(report.lineage, key=lambda e: (e.relation == "unrelated", -abs(e.cosine)))
    coefficients = {e.repo_id: e.per_layer_coefficient for e in lineage if e.per_layer_coefficient}
    cosines = {e.repo_id: e.per_layer_cosine for e in lineage if e.per_layer_cosine}
    barrier_series = [charts.Series(b.other_repo_id, b.alphas, b.losses) for b in report.barriers]
    rob = report.backdoor.robustness_curve
    scale = report.protection.scale_curve
    return {
        "report": report,
        "subject": report.subject,
        "verdict": verdict(report),
        "findings": [
            {"f": f, "remediation": _remediation(f, rule_map), "rule": rule_map.get(f.rule_id)}
            for f in sorted_findings(report.active_findings)
        ],
        "suppressed": [
            {"f": f, "remediation": _remediation(f, rule_map), "rule": rule_map.get(f.rule_id)}
            for f in report.findings if f.suppressed
        ],
        "lineage": [
            {"e": e, "href": link(e.repo_id), "status": _lineage_status(e)} for e in lineage
        ],
        # Optional measurements get a column only when some row has them (no empty columns).
        "lineage_cols": {k: any(getattr(e, k) is not None for e in lineage)
                         for k in ("coefficient", "p_value", "z_score", "barrier")},
        "meta": {"owner": report.subject.owner, "owner_href": None, "created_at": None,
                 **(meta or {})},
        "link": link,
        "hub_url": "https://huggingface.co",
        "related_owners": _related_owners(report),
        "coefficient_chart": charts.coefficient_bars(coefficients) if coefficients else None,
        "heatmap_chart": charts.similarity_heatmap(cosines) if cosines else None,
        "barrier_chart": charts.line_chart(
            barrier_series, title="Loss along the interpolation path", x_label="alpha",
            y_label="loss", css_class="chart-barrier", x_range=(0.0, 1.0),
        ) if barrier_series else None,
        "robustness_chart": charts.line_chart(
            [charts.Series("attack success rate", [p[0] for p in rob], [p[1] for p in rob])],
            title="Trigger robustness under merging", x_label="weight of the backdoored delta",
            y_label="attack success rate", css_class="chart-robustness",
        ) if rob else None,
        "scale_chart": charts.line_chart(
            [charts.Series("loss", [p[0] for p in scale], [p[1] for p in scale])],
            title="Scale sweep", x_label="scale of the delta", y_label="loss",
            css_class="chart-scale",
        ) if scale else None,
    }


def render_page(template: str, *, root: str | None, **context: Any) -> str:
    """Render one page; ``root`` is the relative path to the site root ("" or "../")."""
    env = environment()
    from auditor import __version__

    return env.get_template(template).render(
        root=root, version=__version__, generated_at=context.pop("generated_at", _now()),
        **context,
    )


def format_report(report: AuditReport, *, rules: Sequence[RuleMeta] = ()) -> str:
    """A single self-contained HTML page for one audit (no links out, no scripts)."""
    return render_page("model.j2", root=None, **model_context(report, rules=rules))
