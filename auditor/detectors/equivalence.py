"""Candidates whose predictions the subject reproduces while its weights are far apart."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from auditor.detectors.base import Detector
from auditor.detectors.behaviour import BehaviourModel, candidate_sources
from auditor.detectors.context import AuditContext, StageResult
from auditor.detectors.lineage import Lineage
from auditor.detectors.weights import CandidateWeights

# Function-equivalent copy: predictions nearly identical (mean KL in nats) while the
# weights sit far apart (relative to the candidate's own distance from the base).
EQUIVALENCE_KL = 1e-3
EQUIVALENCE_WEIGHT_DISTANCE = 0.5


@dataclass(frozen=True)
class FunctionEquivalence(StageResult):
    repos: tuple[str, ...]

    def measurements(self) -> Mapping[str, Any]:
        return {"function_equivalent_to": list(self.repos)}


def _relative_weight_distance(subject: Any, candidate: Any, base: Any) -> float:
    """||subject - candidate|| / ||candidate - base||, streamed tensor by tensor."""
    num = den = 0.0
    shared = set(subject.keys()) & set(candidate.keys()) & set(base.keys())
    for name in sorted(shared):
        c = candidate.get(name)
        s, b = subject.get(name), base.get(name)
        if s.shape != c.shape or c.shape != b.shape:
            continue
        num += float((s - c).pow(2).sum())
        den += float((c - b).pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.inf


def detect_function_equivalence(ctx: AuditContext) -> None:
    """Candidates whose predictions the subject reproduces while its weights are far apart."""
    from auditor.analysis.barrier import function_distance, model_log_probs
    from auditor.analysis.modeling import load_state_into

    setup = ctx.get(BehaviourModel)
    found: list[str] = []
    # related candidates first, at most 2 x behaviour_top_k of them
    entries = {e.repo_id: e for e in ctx.get(Lineage).result.entries}
    sources = candidate_sources(ctx)
    ranked = sorted(sources, key=lambda r: (
        r not in entries or entries[r].relation == "unrelated",
        -abs(entries[r].cosine) if r in entries else 0.0, r))
    reference = None  # the subject's predictions: computed once, compared to each
    for repo_id in ranked[:2 * max(1, ctx.settings.behaviour_top_k)]:
        src = sources[repo_id]
        if reference is None:
            load_state_into(setup.work, setup.subject)
            reference = model_log_probs(setup.spec, setup.work, probes=setup.probes)
        kl = function_distance(setup.spec, setup.subject, src, probes=setup.probes,
                               model=setup.work, reference=reference)
        if kl > EQUIVALENCE_KL:
            continue
        if _relative_weight_distance(setup.subject, src, setup.base) > (
            EQUIVALENCE_WEIGHT_DISTANCE
        ):
            found.append(repo_id)
    ctx.provide(FunctionEquivalence(repos=tuple(found)))


DETECTOR = Detector("equivalence", detect_function_equivalence,
                    requires=(BehaviourModel, CandidateWeights, Lineage),
                    provides=(FunctionEquivalence,))
