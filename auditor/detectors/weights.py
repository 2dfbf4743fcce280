"""Stream the subject, its base and the candidates; align; fingerprint the task vectors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from auditor.detectors.base import Detector
from auditor.detectors.context import AuditContext, OpenModel, StageResult
from auditor.errors import AuditorError, NonFiniteWeights, WeightsError
from auditor.schema import FileIssue

if TYPE_CHECKING:
    from auditor.analysis.fingerprint import Fingerprint
    from auditor.weights.base import TensorSource


@dataclass(frozen=True)
class ModelWeights:
    """One model's task-vector fingerprint and the weights it was computed from."""

    fingerprint: Fingerprint
    aligned: bool = False  # a function-preserving disguise was undone before comparing
    alignment: Any = None  # auditor.analysis.align's report (None for adapters)
    source: TensorSource | None = None  # the weights compared (aligned when disguised)
    raw_source: TensorSource | None = None  # as published (None for adapters)
    adapter_exact: bool | None = None


@dataclass(frozen=True)
class BaseWeights(StageResult):
    source: TensorSource
    fingerprint: Fingerprint


@dataclass(frozen=True)
class SubjectWeights(StageResult):
    """Present only when the subject's weights were analysed (else: not "clean")."""

    weights: ModelWeights


@dataclass(frozen=True)
class NonFiniteTensors(StageResult):
    """The subject's tensors holding NaN / inf, left out of every comparison (AUD501)."""

    names: tuple[str, ...]

    def measurements(self) -> Mapping[str, Any]:
        return {"nonfinite_tensors": list(self.names)}


@dataclass(frozen=True)
class CandidateWeights(StageResult):
    by_repo: Mapping[str, ModelWeights] = field(default_factory=dict)


def open_weights(model: OpenModel) -> TensorSource:
    """The model's full weights (adapter files left out), streamed from disk."""
    from auditor.weights.reader import open_model

    files = {n: p for n, p in model.files.items() if not n.startswith("adapter_")}
    return open_model(files)


def _fingerprint(
    ctx: AuditContext, model: OpenModel, base_src: TensorSource, *, role: str
) -> ModelWeights:
    """Task-vector fingerprint of one model against the base, disguises undone first."""
    from auditor.analysis.align import align_to_base
    from auditor.analysis.fingerprint import compute_fingerprint
    from auditor.weights.lora import lora_deltas
    from auditor.weights.task_vectors import model_deltas

    if model.inventory.has_adapter and not model.inventory.safetensors:
        adapter_files = {n: p for n, p in model.files.items() if n.startswith("adapter_")}
        deltas, areport = lora_deltas(adapter_files, base_src)
        if not areport.exact:
            ctx.file_issues.append(
                FileIssue(path=model.inventory.adapter_weights or "adapter",
                          kind="adapter", message=areport.reason or "not exactly reconstructable")
            )
        return ModelWeights(fingerprint=compute_fingerprint(deltas),
                            adapter_exact=areport.exact)
    src = open_weights(model)
    ctx.open_sources.append(src)
    config = model.config or (ctx.base.config if ctx.base else None)
    aligned = align_to_base(src, base_src, config=config)
    disguised = _disguise_detected(aligned.report, config or {})
    # Ordinary fine-tuning also moves a few neuron scales; only a real disguise (a
    # permutation, or most units rescaled) justifies comparing the aligned weights.
    chosen = aligned.source if disguised else src
    deltas, report = model_deltas(chosen, base_src, model_config=model.config,
                                  base_config=ctx.base.config if ctx.base else None)
    for name, (old, new) in report.resized.items():
        ctx.file_issues.append(FileIssue(
            path=name, kind="vocab_resize",
            message=f"{role}: vocabulary resized from {old} to {new} rows; shared rows compared"))
    return ModelWeights(fingerprint=compute_fingerprint(deltas), aligned=disguised,
                        alignment=aligned.report, source=chosen, raw_source=src)


def _disguise_detected(report: Any, config: dict[str, Any]) -> bool:
    """A function-preserving disguise: neurons permuted, or a large share of units rescaled."""
    if report.permuted:
        return True
    layers = {la.layer for la in report.layers}
    inter = int(config.get("intermediate_size") or 0)
    heads = int(config.get("num_attention_heads") or 0)
    units = len(layers) * (inter + 2 * heads)
    rescaled = sum(la.rescaled for la in report.layers)
    return units > 0 and rescaled / units > 0.2


def detect_weights(ctx: AuditContext) -> None:
    """Stream the subject and its base, align the subject, fingerprint its task vector."""
    from auditor.analysis.fingerprint import fingerprint_weights, nonfinite_tensors

    if ctx.base is None or not ctx.subject.files:
        return
    try:
        base_src = open_weights(ctx.base)
    except WeightsError as exc:
        raise AuditorError(f"base {ctx.base.resolved.repo_id}: {exc}") from exc
    ctx.open_sources.append(base_src)
    try:
        subject = _fingerprint(ctx, ctx.subject, base_src, role="subject")
    except WeightsError as exc:
        if isinstance(exc, NonFiniteWeights):
            ctx.provide(NonFiniteTensors(names=tuple(exc.tensors[:1000])))
        # The weights could not be analysed: never "clean" (exit code 2 unless a finding).
        ctx.file_issues.append(FileIssue(path=ctx.subject.resolved.repo_id, kind="weights",
                                         message=str(exc)))
        ctx.errors.append(f"weights: {exc}")
        return
    ctx.provide(SubjectWeights(weights=subject))
    nonfinite = nonfinite_tensors(subject.fingerprint)
    if nonfinite:
        # A finding of its own (AUD501); lineage still runs on the finite tensors, the
        # behavioural stage says it could not run.
        ctx.provide(NonFiniteTensors(names=tuple(nonfinite)))
        ctx.file_issues.append(FileIssue(
            path=ctx.subject.resolved.repo_id, kind="nonfinite",
            message=f"{len(nonfinite)} tensor(s) hold NaN or infinite values, left out of "
                    f"the comparison: {', '.join(nonfinite[:5])}"))
    ctx.provide(BaseWeights(source=base_src, fingerprint=fingerprint_weights(base_src)))
    candidates: dict[str, ModelWeights] = {}
    for repo_id, cand in ctx.candidates.items():
        try:
            candidates[repo_id] = _fingerprint(ctx, cand, base_src, role=repo_id)
        except AuditorError as exc:
            ctx.errors.append(f"candidate {repo_id}: {exc}")
    ctx.provide(CandidateWeights(by_repo=candidates))


DETECTOR = Detector("weights", detect_weights,
                    provides=(SubjectWeights, BaseWeights, CandidateWeights, NonFiniteTensors))
