"""Relate the subject to every candidate and homologue: parents, clones, coefficients."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from auditor.detectors.base import Detector
from auditor.detectors.context import AuditContext, StageResult
from auditor.detectors.weights import BaseWeights, CandidateWeights, SubjectWeights

if TYPE_CHECKING:
    from auditor.analysis.lineage import LineageResult


@dataclass(frozen=True)
class Lineage(StageResult):
    result: LineageResult

    def measurements(self) -> Mapping[str, Any]:
        return {"lineage": self.result.entries, "merge": self.result.merge}


def _comparable_times(times: dict[str, Any]) -> dict[str, Any]:
    """Timezone-aware UTC for all (SQLite returns naive datetimes for stored UTC times)."""
    from datetime import UTC

    return {k: v if v.tzinfo else v.replace(tzinfo=UTC) for k, v in times.items()}


def detect_lineage(ctx: AuditContext) -> None:
    """Relate the subject to every candidate and homologue: parents, clones, coefficients."""
    from auditor.analysis.lineage import analyze_lineage

    fps: dict[str, Any] = {}
    revisions: dict[str, str] = {}
    created: dict[str, Any] = {}
    for repo_id, ref in ctx.homologues.items():
        if repo_id == ctx.subject.resolved.repo_id:
            continue
        fps[repo_id] = ref.fingerprint
        if ref.revision:
            revisions[repo_id] = ref.revision
        if ref.created_at is not None:
            created[repo_id] = ref.created_at
    for repo_id, weights in ctx.get(CandidateWeights).by_repo.items():
        fps[repo_id] = weights.fingerprint
        resolved = ctx.candidates[repo_id].resolved
        revisions[repo_id] = resolved.revision
        if resolved.created_at is not None:
            created[repo_id] = resolved.created_at
    if not fps:
        # "No findings" after comparing against nothing is not clean: say what was not run.
        ctx.skip("no candidates to compare against: merges and copies of other models "
                 "cannot be seen (pass --against, or audit with a store that holds the "
                 "base's other derivatives)")
    subject = ctx.get(SubjectWeights).weights
    result = analyze_lineage(
        subject.fingerprint,
        fps,
        declared_parents=ctx.declared_parents,
        base_fingerprint=ctx.get(BaseWeights).fingerprint,
        subject_aligned=subject.aligned,
        revisions=revisions,
        created_at=_comparable_times(created),
    )
    ctx.provide(Lineage(result=result))


DETECTOR = Detector("lineage", detect_lineage,
                    requires=(SubjectWeights, BaseWeights, CandidateWeights),
                    provides=(Lineage,))
