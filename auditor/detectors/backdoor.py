"""Trigger candidates, behavioural confirmation, merge robustness, inheritance."""

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
    from auditor.schema import BackdoorInfo
    from auditor.settings import Settings


@dataclass(frozen=True)
class Backdoor(StageResult):
    info: BackdoorInfo

    def measurements(self) -> Mapping[str, Any]:
        return {"backdoor": self.info}


def detect_backdoor(ctx: AuditContext) -> None:
    """Trigger candidates, behavioural confirmation, merge robustness, inheritance."""
    from auditor.analysis.backdoor import BackdoorConfig, LoadedModel, analyze_backdoor
    from auditor.analysis.modeling import load_state_into

    setup = ctx.get(BehaviourModel)
    parents = {e.repo_id for e in ctx.get(Lineage).result.entries
               if e.relation in ("merge_parent", "finetune_parent", "clone")}
    flagged = {repo: list(ref.backdoor.triggers) for repo, ref in ctx.homologues.items()
               if repo in parents and ref.backdoor is not None and ref.backdoor.suspected
               and ref.backdoor.triggers}
    # The chat template (when the model ships one): prompts are also tried inside it.
    if not getattr(setup.tokenizer, "chat_template", None):
        from auditor.analysis.backdoor_invert import load_chat_template

        for ref in (ctx.subject, ctx.base):
            if ref is not None and "tokenizer.json" in ref.files:
                template = load_chat_template(ref.folder)
                if template:
                    setup.tokenizer.chat_template = template
                break
    # The working model becomes the subject (loaded in place: no second model in memory).
    load_state_into(setup.work, setup.subject)
    subject = LoadedModel(model=setup.work,
                          tokenizer=setup.tokenizer, weights=setup.subject,
                          repo_id=ctx.subject.resolved.repo_id,
                          revision=ctx.subject.resolved.revision)
    # Probes sampled from the base, not the subject: a backdoored model's own samples
    # can already carry its payload, which hides the trigger's effect.
    # References: fine-tunes of the same base that are not the subject's parents (siblings
    # included): behaviour the subject shows and its relatives do not is the evidence.
    homologues = benign_homologues(ctx, relations=("unrelated", "related", "sibling"))
    ctx.provide(Backdoor(info=analyze_backdoor(
        subject=subject, base=setup.base, homologues=homologues,
        probes=setup.probes, flagged_parents=flagged or None,
        config=BackdoorConfig(max_forward_passes=ctx.settings.backdoor_max_forward_passes,
                              max_tokens=search_tokens(ctx.settings, setup.spec.config)),
    )))


def search_tokens(settings: Settings, config: Mapping[str, Any]) -> int:
    """The search's token budget: ``backdoor_max_tokens``, less when the model is so large
    that those tokens would not fit the compute budget of its device."""
    from auditor.analysis.compute import count_params, resolve_device

    flops = (settings.backdoor_gpu_flops if resolve_device(settings.device).type == "cuda"
             else settings.backdoor_cpu_flops)
    fits = int(flops / max(2.0 * count_params(config), 1.0))
    return max(1, min(settings.backdoor_max_tokens, fits))


DETECTOR = Detector("backdoor", detect_backdoor,
                    requires=(BehaviourModel, Lineage, CandidateWeights), provides=(Backdoor,))
