"""Is the subject merge-resistant (MergeLock/PaRaMS-style) or scale-trapped (Trap²)?"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from auditor.detectors.base import Detector
from auditor.detectors.behaviour import BehaviourModel, benign_homologues
from auditor.detectors.context import AuditContext, StageResult
from auditor.detectors.lineage import Lineage
from auditor.detectors.weights import CandidateWeights

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
    ctx.provide(Protection(info=assess_protection(
        setup.spec, setup.base, setup.subject,
        # Any homologue but its own parents and copies: merging with a sibling on a related
        # task is exactly what a merger would do.
        homologues=benign_homologues(ctx, relations=("unrelated", "related")),
        probes=setup.probes,
    )))


DETECTOR = Detector("protection", detect_protection,
                    requires=(BehaviourModel, Lineage, CandidateWeights),
                    provides=(Protection,))
