"""The built-in detectors, in run order. See ``auditor.detectors`` for the registry."""

from __future__ import annotations

from typing import Any

from auditor.detectors import register
from auditor.errors import AuditorError, NonFiniteWeights, WeightsError
from auditor.orchestrator import AuditContext, OpenModel
from auditor.schema import FileIssue, PickleScan
from auditor.weights.base import TensorSource


@register("pickles", needs_weights=False)
def detect_pickles(ctx: AuditContext) -> None:
    """Scan pickle-format files statically (never loaded) for the imports they would run."""
    scans: list[PickleScan] = []
    resolved = ctx.subject.resolved
    for name in ctx.subject.inventory.pickles:
        try:
            path = ctx.client.fetch(resolved, name)
        except AuditorError as exc:
            ctx.file_issues.append(FileIssue(path=name, kind="download", message=str(exc)))
            continue
        from auditor.weights.pickles import scan_pickle

        scan = scan_pickle(path)
        scans.append(scan.model_copy(update={"path": name}))
    ctx.values["pickles"] = scans


def open_weights(model: OpenModel) -> TensorSource:
    from auditor.weights.reader import open_model

    files = {n: p for n, p in model.files.items() if not n.startswith("adapter_")}
    return open_model(files)


def _fingerprint(
    ctx: AuditContext, model: OpenModel, base_src: TensorSource, *, role: str
) -> tuple[Any, dict[str, Any]]:
    """Task-vector fingerprint of one model against the base, disguises undone first."""
    from auditor.analysis.align import align_to_base
    from auditor.analysis.fingerprint import compute_fingerprint
    from auditor.weights.lora import lora_deltas
    from auditor.weights.task_vectors import model_deltas

    info: dict[str, Any] = {}
    if model.inventory.has_adapter and not model.inventory.safetensors:
        adapter_files = {n: p for n, p in model.files.items() if n.startswith("adapter_")}
        deltas, areport = lora_deltas(adapter_files, base_src)
        info["adapter_exact"] = areport.exact
        if not areport.exact:
            ctx.file_issues.append(
                FileIssue(path=model.inventory.adapter_weights or "adapter",
                          kind="adapter", message=areport.reason or "not exactly reconstructable")
            )
        fp = compute_fingerprint(deltas)
        return fp, info
    src = open_weights(model)
    ctx.state.setdefault("closers", []).append(src)
    config = model.config or (ctx.base.config if ctx.base else None)
    aligned = align_to_base(src, base_src, config=config)
    disguised = _disguise_detected(aligned.report, config or {})
    info["aligned"] = disguised
    info["alignment"] = aligned.report
    # Ordinary fine-tuning also moves a few neuron scales; only a real disguise (a
    # permutation, or most units rescaled) justifies comparing the aligned weights.
    chosen = aligned.source if disguised else src
    deltas, report = model_deltas(chosen, base_src, model_config=model.config,
                                  base_config=ctx.base.config if ctx.base else None)
    for name, (old, new) in report.resized.items():
        ctx.file_issues.append(FileIssue(
            path=name, kind="vocab_resize",
            message=f"{role}: vocabulary resized from {old} to {new} rows; shared rows compared"))
    info["source"] = chosen
    info["raw_source"] = src
    return compute_fingerprint(deltas), info


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


@register("weights", needs_weights=False)
def detect_weights(ctx: AuditContext) -> None:
    """Stream the subject and its base, align the subject, fingerprint its task vector."""
    from auditor.analysis.fingerprint import fingerprint_weights, nonfinite_tensors

    if ctx.base is None or not ctx.subject.files:
        return
    try:
        base_src = open_weights(ctx.base)
    except WeightsError as exc:
        raise AuditorError(f"base {ctx.base.resolved.repo_id}: {exc}") from exc
    ctx.state.setdefault("closers", []).append(base_src)
    ctx.state["base_source"] = base_src
    try:
        fp, info = _fingerprint(ctx, ctx.subject, base_src, role="subject")
    except WeightsError as exc:
        if isinstance(exc, NonFiniteWeights):
            ctx.values["nonfinite_tensors"] = exc.tensors[:1000]
        # The weights could not be analysed: never "clean" (exit code 2 unless a finding).
        ctx.file_issues.append(FileIssue(path=ctx.subject.resolved.repo_id, kind="weights",
                                         message=str(exc)))
        ctx.errors.append(f"weights: {exc}")
        return
    ctx.state.update(fingerprint=fp, subject_info=info, weights_analyzed=True)
    nonfinite = nonfinite_tensors(fp)
    if nonfinite:
        # A finding of its own (AUD501); lineage still runs on the finite tensors, the
        # behavioural detectors say they could not run (see run_detectors).
        ctx.values["nonfinite_tensors"] = nonfinite
        ctx.file_issues.append(FileIssue(
            path=ctx.subject.resolved.repo_id, kind="nonfinite",
            message=f"{len(nonfinite)} tensor(s) hold NaN or infinite values, left out of "
                    f"the comparison: {', '.join(nonfinite[:5])}"))
    ctx.state["base_fingerprint"] = fingerprint_weights(base_src)
    cand_fps: dict[str, Any] = {}
    cand_info: dict[str, dict[str, Any]] = {}
    for repo_id, cand in ctx.candidates.items():
        try:
            cand_fps[repo_id], cand_info[repo_id] = _fingerprint(ctx, cand, base_src,
                                                                 role=repo_id)
        except AuditorError as exc:
            ctx.errors.append(f"candidate {repo_id}: {exc}")
    ctx.state["candidate_fingerprints"] = cand_fps
    ctx.state["candidate_info"] = cand_info


def _comparable_times(times: dict[str, Any]) -> dict[str, Any]:
    """Timezone-aware UTC for all (SQLite returns naive datetimes for stored UTC times)."""
    from datetime import UTC

    return {k: v if v.tzinfo else v.replace(tzinfo=UTC) for k, v in times.items()}


@register("lineage")
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
    for repo_id, fp in ctx.state.get("candidate_fingerprints", {}).items():
        fps[repo_id] = fp
        resolved = ctx.candidates[repo_id].resolved
        revisions[repo_id] = resolved.revision
        if resolved.created_at is not None:
            created[repo_id] = resolved.created_at
    info = ctx.state.get("subject_info", {})
    result = analyze_lineage(
        ctx.state["fingerprint"],
        fps,
        declared_parents=ctx.declared_parents,
        base_fingerprint=ctx.state.get("base_fingerprint"),
        subject_aligned=bool(info.get("aligned")),
        revisions=revisions,
        created_at=_comparable_times(created),
    )
    ctx.state["lineage_result"] = result
    ctx.values["lineage"] = result.entries
    ctx.values["merge"] = result.merge
