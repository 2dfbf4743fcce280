"""The card's origin claims against the weights: the facts of the lying-card rules
(AUD601-AUD604): no card, another base, "finetune" for a merge, parents not detected."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from auditor.detectors.base import Detector
from auditor.detectors.context import AuditContext, StageResult
from auditor.detectors.lineage import Lineage
from auditor.schema import ProvenanceInfo


@dataclass(frozen=True)
class CardClaims(StageResult):
    info: ProvenanceInfo

    def measurements(self) -> Mapping[str, Any]:
        return {"provenance": self.info}


def detect_card_claims(ctx: AuditContext) -> None:
    """Probe the subject against the base (about 1% of its bytes, by range reads) and set
    what its card claims next to what the weights and the lineage show."""
    from auditor.analysis.card_claims import card_claims

    if ctx.base is None:
        return
    ctx.provide(CardClaims(info=card_claims(
        client=ctx.client, subject=ctx.subject.resolved, base=ctx.base.resolved,
        lineage=ctx.get(Lineage).result.entries, family=list(ctx.homologues),
        subject_files=ctx.subject.files, base_files=ctx.base.files)))


DETECTOR = Detector("provenance", detect_card_claims, requires=(Lineage,),
                    provides=(CardClaims,))
