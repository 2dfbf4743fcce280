"""What the base and owner pages say about one derivative, from its audit report alone.

The base is the reference the task vectors are taken against, so a report has no lineage
entry for it: the relation to the base comes from the merge analysis, the clone and parent
entries, and the loss barrier to the base.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from auditor.schema import AuditReport, LineageEntry

DETECTED = ("merge_parent", "finetune_parent", "clone")


@dataclass(frozen=True)
class Thresholds:
    """When the lineage analysis calls a model a parent or a copy (shown on owner pages)."""

    p_value: float
    min_gain: float
    clone_cosine: float


@lru_cache(maxsize=1)
def lineage_thresholds() -> Thresholds:
    # Read from the analysis itself, so the page can never show stale numbers.
    from auditor.analysis.lineage import analyze_lineage

    params = inspect.signature(analyze_lineage).parameters
    return Thresholds(p_value=params["p_threshold"].default,
                      min_gain=params["min_gain"].default,
                      clone_cosine=params["clone_cosine"].default)


def relation_to_base(report: AuditReport, base_id: str, *, basin_barrier: float) -> str:
    """A short phrase: merge of N parents (method), copy of X, fine-tune, ..."""
    if report.subject.base_repo_id is None and not report.lineage and not report.barriers:
        return "not analysed"
    clone = next((e for e in report.lineage if e.relation == "clone"), None)
    if clone is not None:
        return f"copy of {clone.repo_id}"
    parents = [e for e in report.lineage if e.relation == "merge_parent"]
    if report.merge.is_merge and parents:
        method = f", {report.merge.method.replace('_', ' ')}" if report.merge.method else ""
        return f"merge of {len(parents)} parent{'s' if len(parents) != 1 else ''}{method}"
    ft = next((e for e in report.lineage if e.relation == "finetune_parent"), None)
    if ft is not None:
        return f"fine-tune of {ft.repo_id}"
    barrier = next((b for b in report.barriers if b.other_repo_id == base_id), None)
    if barrier is not None and barrier.relative_barrier > basin_barrier:
        return "not in the base's basin"
    if report.subject.base_repo_id == base_id:
        return "fine-tune of the base"
    if report.subject.base_repo_id:
        return f"derived via {report.subject.base_repo_id}"
    return "not analysed"


def strongest_link(report: AuditReport) -> LineageEntry | None:
    """The detected parent or copy with the largest coefficient, else the most similar."""
    detected = [e for e in report.lineage if e.relation in DETECTED]
    if detected:
        return max(detected, key=lambda e: (e.coefficient or 0.0, e.cosine))
    if report.lineage:
        return max(report.lineage, key=lambda e: abs(e.cosine))
    return None


def parents_text(report: AuditReport) -> list[dict[str, Any]]:
    return [{"repo_id": e.repo_id, "coefficient": e.coefficient, "declared": e.declared,
             "relation": e.relation}
            for e in report.lineage if e.relation in DETECTED]


def barrier_to(report: AuditReport, base_id: str) -> float | None:
    b = next((b for b in report.barriers if b.other_repo_id == base_id), None)
    return b.relative_barrier if b is not None else None
