"""Loss along the straight path from the subject to its base and to related models."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from auditor.detectors.base import Detector
from auditor.detectors.behaviour import BehaviourModel, candidate_sources, download_weights
from auditor.detectors.context import AuditContext, StageResult
from auditor.detectors.lineage import Lineage
from auditor.detectors.weights import CandidateWeights
from auditor.errors import AuditorError

if TYPE_CHECKING:
    from auditor.schema import BarrierCurve, LineageEntry



@dataclass(frozen=True)
class Barriers(StageResult):
    curves: tuple[BarrierCurve, ...]
    lineage: tuple[LineageEntry, ...]  # the lineage entries with their barrier filled in

    def measurements(self) -> Mapping[str, Any]:
        return {"barriers": list(self.curves), "lineage": list(self.lineage)}


def detect_barriers(ctx: AuditContext) -> None:
    """Loss along the straight path from the subject to its base and to related candidates."""
    from auditor.analysis.barrier import loss_path

    setup = ctx.get(BehaviourModel)
    points = setup.points
    # curves to the top-K related candidates only (Settings.behaviour_top_k)
    top_k = max(1, ctx.settings.behaviour_top_k)
    curves = []
    base_id = ctx.base.resolved.repo_id if ctx.base else "base"
    curves.append(loss_path(setup.spec, setup.subject, setup.base,
                            probes=setup.probes, points=points, other_repo_id=base_id,
                            model=setup.work))
    lineage = ctx.get(Lineage).result.entries
    entries = {e.repo_id: e for e in lineage}
    sources = candidate_sources(ctx)
    # Parents and clones known only by their stored fingerprint (daemon audits) are
    # downloaded for their curve: the report plots the barrier to every related model.
    for entry in sorted(entries.values(), key=lambda e: -abs(e.cosine)):
        if len(sources) >= top_k:
            break
        ref = ctx.homologues.get(entry.repo_id)
        if entry.relation == "unrelated" or entry.repo_id in sources or ref is None:
            continue
        try:
            sources[entry.repo_id] = download_weights(ctx, entry.repo_id, ref.revision)
        except AuditorError as exc:
            ctx.add_error(f"{entry.repo_id}: {exc}", kind=type(exc).__name__)
    ranked = sorted((e for e in entries.values() if e.repo_id in sources),
                    key=lambda e: (e.relation == "unrelated", -abs(e.cosine)))
    for entry in ranked[:top_k]:
        # every curve starts at the subject alone: measured once, on the first curve
        curves.append(loss_path(setup.spec, setup.subject, sources[entry.repo_id],
                                probes=setup.probes, points=points,
                                other_repo_id=entry.repo_id, model=setup.work,
                                start_loss=curves[0].losses[0]))
    by_repo = {c.other_repo_id: c for c in curves}
    ctx.provide(Barriers(curves=tuple(curves), lineage=tuple(
        e.model_copy(update={"barrier": by_repo[e.repo_id].barrier}) if e.repo_id in by_repo
        else e
        for e in lineage
    )))


DETECTOR = Detector("barrier", detect_barriers,
                    requires=(BehaviourModel, Lineage, CandidateWeights), provides=(Barriers,))
