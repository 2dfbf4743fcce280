"""Is the subject merge-resistant (MergeLock/PaRaMS-style) or scale-trapped (Trap²)?"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from auditor.detectors.base import Detector
from auditor.detectors.behaviour import (
    REDUCED_HOMOLOGUES,
    BehaviourModel,
    benign_homologues,
    candidate_sources,
    download_weights,
)
from auditor.detectors.context import AuditContext, StageResult
from auditor.detectors.lineage import Lineage
from auditor.detectors.weights import CandidateWeights, SubjectWeights

if TYPE_CHECKING:
    from auditor.schema import ProtectionInfo


@dataclass(frozen=True)
class Protection(StageResult):
    info: ProtectionInfo

    def measurements(self) -> Mapping[str, Any]:
        return {"protection": self.info}


def detect_protection(ctx: AuditContext) -> None:
    """Is the subject merge-resistant (MergeLock/PaRaMS-style) or scale-trapped (Trap²)?"""
    from auditor.analysis.protection import assess_protection

    setup = ctx.get(BehaviourModel)
    # Any homologue but its own parents and copies: merging with a sibling on a related
    # task is exactly what a merger would do.
    homologues = benign_homologues(ctx, relations=("unrelated", "related", "sibling"))
    if setup.reduced:
        homologues = homologues[:REDUCED_HOMOLOGUES]
    # merged into the audit's one working model: no third copy of the model in memory
    info = assess_protection(
        setup.spec, setup.base, setup.subject, homologues=homologues, probes=setup.probes,
        work=setup.work,
    )
    ctx.provide(Protection(info=_against_source(ctx, setup, info)))


def _against_source(ctx: AuditContext, setup: BehaviourModel, info: ProtectionInfo
                    ) -> ProtectionInfo:
    """A disguised subject that is a copy of a known model: how far the midpoint of the
    two moves the predictions (``protection_source``), on probes sampled from the
    subject. A re-upload stays in its source's basin; a protected copy does not."""
    from auditor.analysis.modeling import load_state_into
    from auditor.analysis.probes import build_probes
    from auditor.analysis.protection_source import compare_with_source
    from auditor.errors import AnalysisError, AuditorError

    if not ctx.get(SubjectWeights).weights.aligned:
        return info
    clones = [e for e in ctx.get(Lineage).result.entries if e.relation == "clone"]
    if not clones:
        return info
    repo = clones[0].repo_id
    source = candidate_sources(ctx).get(repo)
    try:
        if source is None:
            ref = ctx.homologues.get(repo)
            source = download_weights(ctx, repo, ref.revision if ref else None)
        load_state_into(setup.work, setup.subject)
        own_probes = build_probes(tokenizer=setup.tokenizer, sampler=setup.work,
                                  use_builtin=False, probe_file=None, seed=1)
        cmp = compare_with_source(setup.spec, setup.base, setup.subject, source,
                                  probes=own_probes, work=setup.work)
    except (AuditorError, AnalysisError) as exc:
        ctx.errors.append(f"protection against {repo}: {exc}")
        return info
    return info.model_copy(update={"merge_resistant": cmp.resistant,
                                   "merged_loss_ratio": cmp.ratio})


DETECTOR = Detector("protection", detect_protection,
                    requires=(BehaviourModel, Lineage, CandidateWeights, SubjectWeights),
                    provides=(Protection,))
