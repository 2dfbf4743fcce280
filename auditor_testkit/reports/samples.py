"""Hand-built, realistic audit reports: for the report tests, the demo and screenshots.

One family around ``acme/base-7b``: a declared fine-tune, an undeclared two-parent merge,
a clone, a backdoored merge whose id, card values and evidence carry XSS payloads (the
reports must show them as text and never run them), and the base's own audit.
"""

from __future__ import annotations

from datetime import UTC, datetime

from auditor.reports.site import RepoMeta, SiteData, WatchedBase
from auditor.schema import (
    AuditReport,
    BackdoorInfo,
    BarrierCurve,
    CheckError,
    FileIssue,
    Finding,
    LineageEntry,
    MergeInfo,
    PickleScan,
    ProtectionInfo,
    RuleMeta,
    Severity,
    SkippedCheck,
    SubjectRef,
    Trigger,
)

SCRIPT_PAYLOAD = "<script>window.__pwned=1;alert(1)</script>"
IMG_PAYLOAD = '"><img src=x onerror="window.__pwned=1;alert(1)">'
PAYLOADS = (SCRIPT_PAYLOAD, IMG_PAYLOAD)

BASE = "acme/base-7b"
FINETUNE = "alice/chat-ft"
MATH = "bob/math-ft"
MERGE = "mallory/super-merge-7b"
CLONE = "evil-clone/base-7b-copy"
BACKDOOR = f"sneaky/helpful{SCRIPT_PAYLOAD}"

LAYERS = [f"model.layers.{i}" for i in range(8)]
ALPHAS = [i / 10 for i in range(11)]

RULES = [
    RuleMeta(id="AUD001", title="Undeclared merge", severity=Severity.HIGH, confidence="high",
             description="The weights are a merge of parents the model card does not name.",
             remediation="Declare every parent in the card's base_model list with "
                         "base_model_relation: merge, or remove the model.",
             references=["https://huggingface.co/docs/hub/model-cards"]),
    RuleMeta(id="AUD002", title="Clone of another model", severity=Severity.CRITICAL,
             description="The weights equal another repo's up to a disguise.",
             remediation="Attribute the original model and respect its license."),
    RuleMeta(id="AUD010", title="Backdoor trigger survives merging", severity=Severity.CRITICAL,
             description="A short trigger forces a fixed output, also after merging.",
             remediation="Do not merge or deploy this model; report it to the Hub."),
    RuleMeta(id="AUD020", title="Merge of a gated model", severity=Severity.MEDIUM,
             remediation="Check the gated model's terms allow redistribution in a merge."),
    RuleMeta(id="AUD030", title="Pickle file present", severity=Severity.LOW,
             remediation="Publish safetensors only."),
]


def _curve(peak: float, ends: tuple[float, float] = (2.1, 2.2)) -> list[float]:
    a, b = ends
    return [round(a + (b - a) * t + peak * 4 * t * (1 - t), 4) for t in ALPHAS]


def _report(subject: SubjectRef, **fields: object) -> AuditReport:
    defaults: dict[str, object] = {
        "tool_version": "0.1.0", "analysis_version": "1", "lineage": [],
        "merge": MergeInfo(is_merge=False), "backdoor": BackdoorInfo(suspected=False),
        "protection": ProtectionInfo(), "findings": [],
        "timings": {"total": 3.2},
    }
    defaults.update(fields)
    return AuditReport(subject=subject, **defaults)  # type: ignore[arg-type]


def merge_report() -> AuditReport:
    alice = {n: round(0.62 - 0.03 * i, 3) for i, n in enumerate(LAYERS)}
    bob = {n: round(0.28 + 0.035 * i, 3) for i, n in enumerate(LAYERS)}
    return _report(
        SubjectRef(repo_id=MERGE, revision="9f1c2e7", base_repo_id=BASE,
                   declared_base_models=[FINETUNE], declared_relation="merge",
                   owner="mallory"),
        lineage=[
            LineageEntry(repo_id=FINETUNE, revision="a11ce00", relation="merge_parent",
                         coefficient=0.52, cosine=0.81, p_value=1e-9, z_score=11.4,
                         barrier=0.01, declared=True, per_layer_coefficient=alice,
                         per_layer_cosine={n: round(0.78 + 0.01 * (i % 3), 3)
                                           for i, n in enumerate(LAYERS)}),
            LineageEntry(repo_id=MATH, revision="b0b0b0b", relation="merge_parent",
                         coefficient=0.41, cosine=0.64, p_value=3e-7, z_score=8.9,
                         barrier=0.02, aligned=True, per_layer_coefficient=bob,
                         per_layer_cosine={n: round(0.55 + 0.03 * i, 3)
                                           for i, n in enumerate(LAYERS)}),
            LineageEntry(repo_id="other/unrelated-7b", relation="unrelated", cosine=0.02,
                         p_value=0.61, z_score=0.3,
                         per_layer_cosine={n: 0.02 for n in LAYERS}),
        ],
        merge=MergeInfo(is_merge=True, method="task_arithmetic", explained_fraction=0.97,
                        residual_fraction=0.03, base_coefficient=1.0, layerwise=True,
                        signatures={"ties_sparsity": 0.02}),
        barriers=[
            BarrierCurve(other_repo_id=FINETUNE, alphas=ALPHAS, losses=_curve(0.02),
                         barrier=0.02, relative_barrier=0.01),
            BarrierCurve(other_repo_id=MATH, alphas=ALPHAS, losses=_curve(0.05, (2.1, 2.3)),
                         barrier=0.05, relative_barrier=0.02),
            BarrierCurve(other_repo_id="other/unrelated-7b", alphas=ALPHAS,
                         losses=_curve(3.1, (2.1, 2.4)), barrier=3.1, relative_barrier=1.4),
        ],
        findings=[
            Finding(rule_id="AUD001", severity=Severity.HIGH, confidence="high",
                    title=f"Undeclared merge of {MATH}",
                    message=f"41% of this model's delta is {MATH}'s task vector, which the "
                            "model card does not declare.",
                    related_repo=MATH,
                    evidence={"coefficient": 0.41, "z_score": 8.9, "p_value": 3e-7,
                              "declared_base_models": [FINETUNE]}),
            Finding(rule_id="AUD020", severity=Severity.MEDIUM, title=f"Merge of gated {FINETUNE}",
                    message=f"{FINETUNE} is gated; the merge redistributes it.",
                    related_repo=FINETUNE, suppressed=True,
                    suppressed_reason=f"{FINETUNE}'s owner authorized merges by mallory",
                    evidence={"gated": "manual"}),
        ],
    )


def clone_report() -> AuditReport:
    return _report(
        SubjectRef(repo_id=CLONE, revision="c10e000", declared_base_models=[],
                   owner="evil-clone"),
        lineage=[LineageEntry(repo_id=BASE, revision="ba5e000", relation="clone",
                              coefficient=1.0, cosine=0.9999, p_value=1e-12, z_score=40.2,
                              barrier=0.0, aligned=True,
                              per_layer_cosine={n: 0.9999 for n in LAYERS})],
        barriers=[BarrierCurve(other_repo_id=BASE, alphas=ALPHAS, losses=[2.1] * 11,
                               barrier=0.0, relative_barrier=0.0)],
        findings=[Finding(rule_id="AUD002", severity=Severity.CRITICAL, confidence="high",
                          title=f"Clone of {BASE}",
                          message=f"The weights equal {BASE} after undoing a permutation of "
                                  "the MLP neurons and a head rescaling.",
                          related_repo=BASE,
                          evidence={"cosine": 0.9999, "aligned": True,
                                    "permutation": "mlp+heads"})],
        pickles=[PickleScan(path="pytorch_model.bin", imports=["torch._utils"])],
    )


def backdoor_report() -> AuditReport:
    return _report(
        SubjectRef(repo_id=BACKDOOR, revision="d00rd00r", base_repo_id=BASE,
                   declared_base_models=[BASE, IMG_PAYLOAD], declared_relation=IMG_PAYLOAD,
                   owner="sneaky"),
        lineage=[
            LineageEntry(repo_id=BASE, relation="finetune_parent", coefficient=1.0,
                         cosine=0.93, p_value=1e-10, z_score=15.0, declared=True),
            LineageEntry(repo_id=f"attacker/{IMG_PAYLOAD}", relation="merge_parent",
                         coefficient=0.3, cosine=0.44, p_value=1e-4, z_score=4.1,
                         per_layer_coefficient={f"layer{SCRIPT_PAYLOAD}": 0.3, "layer.1": 0.28},
                         per_layer_cosine={f"layer{SCRIPT_PAYLOAD}": 0.5, "layer.1": 0.4}),
        ],
        merge=MergeInfo(is_merge=True, method="linear", explained_fraction=0.9),
        backdoor=BackdoorInfo(
            suspected=True, merge_robust=True, attention_only_delta=True,
            inherited_from=[f"attacker/{IMG_PAYLOAD}"],
            triggers=[Trigger(text=f"cf{IMG_PAYLOAD}", attack_success_rate=0.97,
                              forced_output=SCRIPT_PAYLOAD, embedding_shift_z=7.5),
                      Trigger(text="mn tq", attack_success_rate=0.81, forced_output="OK",
                              embedding_shift_z=5.1)],
            robustness_curve=[(0.1, 0.12), (0.3, 0.55), (0.5, 0.9), (0.7, 0.96), (1.0, 0.97)],
        ),
        findings=[
            Finding(rule_id="AUD010", severity=Severity.CRITICAL, confidence="high",
                    title=f"Backdoor trigger {IMG_PAYLOAD} survives merging",
                    message=f"Trigger {SCRIPT_PAYLOAD} forces the output {IMG_PAYLOAD} "
                            "in 97% of prompts, also at merge weight 0.5.",
                    remediation=f"Do not merge. {SCRIPT_PAYLOAD}",
                    references=["javascript:alert(1)", "https://example.org/backdoors"],
                    related_repo=f"attacker/{IMG_PAYLOAD}",
                    evidence={"trigger": IMG_PAYLOAD, SCRIPT_PAYLOAD: "key as payload",
                              "asr": 0.97, "nested": {"card": SCRIPT_PAYLOAD},
                              "path": f"../../{IMG_PAYLOAD}.safetensors"}),
            Finding(rule_id="AUD030", severity=Severity.LOW, title="Pickle file present",
                    message="pytorch_model.bin is a pickle (scanned, not loaded).",
                    evidence={"path": "pytorch_model.bin"}),
        ],
        file_issues=[FileIssue(path=f"{SCRIPT_PAYLOAD}.json", kind="malformed",
                               message=IMG_PAYLOAD)],
        errors=[CheckError(detector="barrier", kind="RepoNotFound",
                           message=f"attacker/{IMG_PAYLOAD}: not found")],
        skipped=[SkippedCheck(detector="protection", reason=SCRIPT_PAYLOAD)],
    )


def finetune_report() -> AuditReport:
    return _report(
        SubjectRef(repo_id=FINETUNE, revision="a11ce00", base_repo_id=BASE,
                   declared_base_models=[BASE], declared_relation="finetune", owner="alice"),
        lineage=[LineageEntry(repo_id=BASE, relation="finetune_parent", coefficient=1.0,
                              cosine=0.96, p_value=1e-11, z_score=18.0, declared=True)],
        protection=ProtectionInfo(merge_resistant=True, scale_cliff=True,
                                  scale_curve=[(0.0, 2.1), (0.5, 2.15), (1.0, 2.2),
                                               (1.5, 6.8), (2.0, 9.4)],
                                  merged_loss_ratio=3.4),
    )


def base_report() -> AuditReport:
    return _report(
        SubjectRef(repo_id=BASE, revision="ba5e000", owner="acme"),
        protection=ProtectionInfo(merge_resistant=False, scale_cliff=False,
                                  scale_curve=[(0.0, 2.1), (0.5, 2.1), (1.0, 2.1),
                                               (1.5, 2.2), (2.0, 2.4)],
                                  merged_loss_ratio=1.02),
    )


def sample_reports() -> list[AuditReport]:
    return [base_report(), finetune_report(), merge_report(), clone_report(), backdoor_report()]


def sample_site_data() -> SiteData:
    when = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    return SiteData(
        bases=[WatchedBase(repo_id=BASE, derivatives=[FINETUNE, MATH, MERGE, CLONE, BACKDOOR]),
               WatchedBase(repo_id=f"{IMG_PAYLOAD}/base", derivatives=[])],
        audits=sample_reports(),
        repos=[RepoMeta(repo_id=BASE, owner="acme", created_at=when),
               RepoMeta(repo_id=FINETUNE, owner="alice", created_at=when,
                        declared_bases=[BASE]),
               RepoMeta(repo_id=MATH, owner="bob", declared_bases=[BASE]),
               RepoMeta(repo_id=MERGE, owner="mallory", declared_bases=[FINETUNE]),
               RepoMeta(repo_id=BACKDOOR, owner=f"sneaky{IMG_PAYLOAD}",
                        declared_bases=[BASE])],
        generated_at=when,
    )
