"""Measurements, findings and the audit report: the types every stage shares.

All are frozen pydantic models so they serialise to the JSON report as they are.
A field whose analysis did not run is ``None``, never a made-up value.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

# 2: ``errors`` holds CheckError objects (was strings) and skipped checks moved from
# ``file_issues`` (kind "skipped") to ``skipped``. Version 1 reports still load (migrated).
SCHEMA_VERSION = 2


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_serializer(mode="wrap")
    def _finite(self, handler: SerializerFunctionWrapHandler) -> Any:
        out = handler(self)
        # Serialised in python mode, tuples stay tuples: keep them (schema types use them).
        return {k: finite_json(v) for k, v in out.items()} if isinstance(out, dict) else out


def finite_json(value: Any) -> Any:
    """``value`` with every NaN / infinity replaced by None (JSON has no such numbers).

    Applied whenever a schema object is serialised, so no report, SARIF log, database row or
    site page can carry one, whatever a detector measured on hostile weights.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    if isinstance(value, tuple):
        return tuple(finite_json(v) for v in value)
    return value


class Severity(StrEnum):
    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return list(Severity).index(self)


# sibling: same data or recipe as the subject (shares its data's direction), never a
# parent and never a finding against its owner; related: derived from the subject or
# otherwise linked without a verdict
Relation = Literal["merge_parent", "finetune_parent", "clone", "sibling", "related", "unrelated"]


class LineageEvidence(Frozen):
    """What decided a lineage verdict, and whether it is enough to accuse."""

    verdict: str  # exact_merge | sparse_merge | finetuned_merge | finetune | sibling | ...
    explained_fraction: float | None = None  # of the subject, by the parents' fit
    residual_ratio: float | None = None  # residual over the family's closest siblings'
    recipe_residual: float | None = None  # residual at the recipe's granularity
    exact_fraction: float | None = None  # sparse merges: kept coordinates reproduced
    layer_consistency: float | None = None  # chi^2/dof of per-layer coefficients
    row_uniformity: float | None = None  # mean squared z of per-row coefficients
    # least explained share a parent carries alone, over the unexplained rest
    parent_own_share: float | None = None
    method: str | None = None  # the method signature (registry entry)
    frame: str = "aligned"  # aligned | raw: fitted on disguised weights as published
    null: str = ""  # what the evidence was tested against
    null_pairs: int = 0
    null_related_pairs: int = 0  # same-domain / sibling pairs in the null
    sibling_residual: float | None = None  # the family's closest sibling residual
    accusable: bool = False
    reason: str = ""


class SubjectRef(Frozen):
    repo_id: str
    revision: str
    base_repo_id: str | None = None
    base_revision: str | None = None
    declared_base_models: list[str] = Field(default_factory=list)
    declared_relation: str | None = None
    owner: str | None = None


class LineageEntry(Frozen):
    repo_id: str
    revision: str | None = None
    relation: Relation
    coefficient: float | None = None
    cosine: float
    p_value: float | None = None
    z_score: float | None = None
    barrier: float | None = None
    aligned: bool = False  # True when a permutation / head-scale alignment was applied first
    declared: bool = False  # the subject's card names this repo as a base
    # A re-upload of another candidate (the oldest of its clone group speaks for it).
    copy_of: str | None = None
    per_layer_cosine: dict[str, float] = Field(default_factory=dict)
    per_layer_coefficient: dict[str, float] = Field(default_factory=dict)
    # the evidence is enough to accuse (a merge verdict; never similarity alone)
    accusable: bool = False
    # this candidate was matched in its disguised (protected) frame, as published
    source_disguised: bool = False
    evidence: LineageEvidence | None = None


class MergeInfo(Frozen):
    is_merge: bool
    method: str | None = None
    explained_fraction: float | None = None
    residual_fraction: float | None = None
    base_coefficient: float | None = None
    layerwise: bool | None = None
    signatures: dict[str, float] = Field(default_factory=dict)


class Trigger(Frozen):
    text: str
    attack_success_rate: float
    forced_output: str | None = None
    embedding_shift_z: float | None = None
    # The trigger's token ids as searched (mid-sentence form), and its controls: attack
    # success of control strings of the same token length, of the base, of the homologues,
    # and the share of clean prompts that already give the forced output.
    token_ids: list[int] = Field(default_factory=list)
    control_asr: float | None = None
    base_asr: float | None = None
    homologue_asr: float | None = None
    clean_prompt_rate: float | None = None
    chat_template: bool = False
    # How it was found: inversion (target inverted, trigger searched), embedding
    # (moved embedding rows), inherited (a parent's trigger), lexicon (last resort).
    method: str | None = None
    # None of its tokens' embedding rows moved beyond the candidate threshold (LoRA,
    # attention-only): found by behaviour alone.
    rows_unmoved: bool = False


class BackdoorInfo(Frozen):
    suspected: bool
    triggers: list[Trigger] = Field(default_factory=list)
    merge_robust: bool | None = None
    attention_only_delta: bool | None = None
    inherited_from: list[str] = Field(default_factory=list)
    robustness_curve: list[tuple[float, float]] = Field(default_factory=list)
    averaged_asr: float | None = None
    # The search stopped at the probe budget (settings.backdoor_*): "not found" is not "clean".
    incomplete: bool = False
    cost: dict[str, float] = Field(default_factory=dict)


class ProtectionInfo(Frozen):
    merge_resistant: bool | None = None
    scale_cliff: bool | None = None
    scale_curve: list[tuple[float, float]] = Field(default_factory=list)
    merged_loss_ratio: float | None = None


MergekitStatus = Literal["confirmed", "weight_mismatch", "not_detected", "not_compared",
                         "undeclared"]


class MergekitParent(Frozen):
    """One parent of the merge, as ``mergekit_config.yml`` declares it and as detected."""

    repo_id: str  # as the config names it (or, for ``undeclared``, the detected repo)
    matched_repo: str | None = None  # the compared repo it was matched to
    declared_weight: float | None = None  # the config's weight (mean of a gradient)
    expected_coefficient: float | None = None  # what the weight means for the task vector
    detected_coefficient: float | None = None
    detected_relation: str | None = None
    status: MergekitStatus


class MergekitCheck(Frozen):
    """``mergekit_config.yml`` compared with the weights: parents, method and weights."""

    declared_method: str | None = None
    detected_method: str | None = None
    method_status: Literal["confirmed", "mismatch", "unknown"] = "unknown"
    parents: list[MergekitParent] = Field(default_factory=list)
    # |declared - detected| allowed: max(abs_tolerance, rel_tolerance * |declared|).
    abs_tolerance: float
    rel_tolerance: float
    weight_mismatches: list[str] = Field(default_factory=list)
    parent_mismatches: list[str] = Field(default_factory=list)
    confirmed: bool = False  # every declared parent, weight and the method match
class ProvenanceInfo(Frozen):
    """What the card claims about the subject's origin against what its weights show.

    ``derived_from_base`` comes from a sampled weight probe against the audited base
    (None: not probed); ``declared_in_family``: a base the card names is the audited base or
    one of its known derivatives (None: could not tell)."""

    base_repo_id: str | None = None
    found_by: list[str] = Field(default_factory=list)
    card_present: bool | None = None
    declared_bases: list[str] = Field(default_factory=list)
    declared_relation: str | None = None
    derived_from_base: bool | None = None
    base_distance: float | None = None
    base_z: float | None = None
    declared_in_family: bool | None = None
    detected_parents: list[str] = Field(default_factory=list)
    declared_not_detected: list[str] = Field(default_factory=list)


class BarrierCurve(Frozen):
    other_repo_id: str
    alphas: list[float]
    losses: list[float]
    barrier: float
    relative_barrier: float


class PickleScan(Frozen):
    path: str
    dangerous_imports: list[str] = Field(default_factory=list)
    suspicious_imports: list[str] = Field(default_factory=list)
    imports: list[str] = Field(default_factory=list)
    error: str | None = None


class FileIssue(Frozen):
    """A problem with one file that did not stop the audit (malformed, skipped)."""

    path: str
    kind: str
    message: str


class CheckError(Frozen):
    """A check that failed: the audit is incomplete (exit code 2 unless a finding)."""

    detector: str  # the detector stage, or "audit" for the audit's own steps
    kind: str  # the error's type (e.g. "WeightsError", "RepoNotFound"), "internal" for a bug
    message: str


class SkippedCheck(Frozen):
    """A check that did not apply to this model (an adapter, an encoder, no weights)."""

    detector: str
    reason: str


class Finding(Frozen):
    rule_id: str
    severity: Severity
    title: str
    message: str
    confidence: str = "medium"
    remediation: str | None = None
    references: list[str] = Field(default_factory=list)
    related_repo: str | None = None
    suppressed: bool = False
    suppressed_reason: str | None = None
    evidence: dict[str, Any] = Field(default_factory=dict)


class RuleMeta(Frozen):
    """What a formatter needs to know of a rule (SARIF rules, HTML remediation)."""

    id: str
    title: str
    severity: Severity
    confidence: str = "medium"
    description: str = ""
    remediation: str = ""
    references: list[str] = Field(default_factory=list)


class Measurements(Frozen):
    """Everything the analysis measured; the rules read this (and only this)."""

    subject: SubjectRef
    lineage: list[LineageEntry] = Field(default_factory=list)
    merge: MergeInfo = MergeInfo(is_merge=False)
    backdoor: BackdoorInfo = BackdoorInfo(suspected=False)
    protection: ProtectionInfo = ProtectionInfo()
    barriers: list[BarrierCurve] = Field(default_factory=list)
    pickles: list[PickleScan] = Field(default_factory=list)
    file_issues: list[FileIssue] = Field(default_factory=list)
    has_safetensors: bool = True
    weights_analyzed: bool = True
    function_equivalent_to: list[str] = Field(default_factory=list)
    declared_mergekit_config: dict[str, Any] | None = None
    # Tensors holding NaN / infinity (subject's; excluded from fingerprints and fits).
    nonfinite_tensors: list[str] = Field(default_factory=list)
    # The card names the repo itself, or a base whose card names the subject: [A, ..., A].
    declared_cycle: list[str] = Field(default_factory=list)
    mergekit: MergekitCheck | None = None
    provenance: ProvenanceInfo = ProvenanceInfo()


class AuditReport(Frozen):
    schema_version: int = SCHEMA_VERSION
    tool_version: str
    analysis_version: str
    subject: SubjectRef
    lineage: list[LineageEntry]
    merge: MergeInfo
    backdoor: BackdoorInfo
    protection: ProtectionInfo
    findings: list[Finding]
    barriers: list[BarrierCurve] = Field(default_factory=list)
    pickles: list[PickleScan] = Field(default_factory=list)
    file_issues: list[FileIssue] = Field(default_factory=list)
    errors: list[CheckError] = Field(default_factory=list)
    skipped: list[SkippedCheck] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    # What the audit compared against: candidates_compared (candidates + stored
    # homologues with a fingerprint), stored_homologues, fingerprints_cached (reused).
    coverage: dict[str, int] = Field(default_factory=dict)
    # Candidates whose predictions the subject reproduces (kept so an incremental update
    # can carry the behavioural result over).
    function_equivalent_to: list[str] = Field(default_factory=list)
    mergekit: MergekitCheck | None = None
    provenance: ProvenanceInfo = ProvenanceInfo()

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        """Read a version-1 report (errors as "detector: message" strings, skips as file
        issues of kind "skipped") as a version-2 one."""
        if not isinstance(data, dict) or int(data.get("schema_version", SCHEMA_VERSION)) >= 2:
            return data
        data = dict(data)
        errors = []
        for item in data.get("errors") or []:
            if isinstance(item, str):
                detector, sep, message = item.partition(": ")
                item = {"detector": detector if sep else "audit", "kind": "unknown",
                        "message": message if sep else item}
            errors.append(item)
        issues = list(data.get("file_issues") or [])
        skipped = [i for i in issues if isinstance(i, dict) and i.get("kind") == "skipped"]
        data["errors"] = errors
        data["file_issues"] = [i for i in issues if i not in skipped]
        data["skipped"] = [{"detector": "behaviour", "reason": i.get("message", "")}
                           for i in skipped] + list(data.get("skipped") or [])
        data["schema_version"] = SCHEMA_VERSION
        return data

    @property
    def active_findings(self) -> list[Finding]:
        return [f for f in self.findings if not f.suppressed]
