"""The built-in detectors, in run order. See ``auditor.detectors`` for the registry."""

from __future__ import annotations

import contextlib
from typing import Any

from auditor.detectors import register
from auditor.errors import AuditorError, WeightsError
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
    from auditor.analysis.disguise_screen import ScreenTap
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
        from auditor.weights.adapter_source import AdapterWeights

        # an adapter is a full homologue: base + its delta, served tensor by tensor
        info["raw_source"] = AdapterWeights(base_src, deltas)
        info["adapter"] = True
        ctx.state.setdefault("closers", []).append(info["raw_source"])
        return fp, info
    src = open_weights(model)
    ctx.state.setdefault("closers", []).append(src)
    config = model.config or (ctx.base.config if ctx.base else None)
    base_config = ctx.base.config if ctx.base else None
    # One pass: the task vector's reads also feed the linear disguise screen; only a
    # suspect model is aligned (and read again), honest ones are never aligned.
    tap = ScreenTap(src, base_src, config=config)
    deltas, report = model_deltas(tap.subject, tap.base, model_config=model.config,
                                  base_config=base_config)
    fp = compute_fingerprint(deltas)
    info["screen"] = tap.screen.summary()
    disguised = False
    chosen: Any = src
    if tap.screen.suspect:
        aligned = align_to_base(src, base_src, config=config)
        info["alignment"] = aligned.report
        # Ordinary fine-tuning also moves a few neuron scales; only a real disguise (a
        # permutation, or most units rescaled) justifies comparing the aligned weights.
        disguised = _disguise_detected(aligned.report, config or {})
        if disguised:
            chosen = aligned.source
            deltas, report = model_deltas(chosen, base_src, model_config=model.config,
                                          base_config=base_config)
            fp = compute_fingerprint(deltas)
    info["aligned"] = disguised
    for name, (old, new) in report.resized.items():
        ctx.file_issues.append(FileIssue(
            path=name, kind="vocab_resize",
            message=f"{role}: vocabulary resized from {old} to {new} rows; shared rows compared"))
    info["source"] = chosen
    info["raw_source"] = src
    return fp, info


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
    from auditor.analysis.fingerprint import fingerprint_weights
    from auditor.store.fpcache import WEIGHTS_KEY

    if ctx.base is None or not ctx.subject.files:
        return
    try:
        base_src = open_weights(ctx.base)
    except WeightsError as exc:
        raise AuditorError(f"base {ctx.base.resolved.repo_id}: {exc}") from exc
    ctx.state.setdefault("closers", []).append(base_src)
    ctx.state["base_source"] = base_src
    cache = ctx.state.get("fp_cache")
    base_key = ctx.base.resolved.revision
    try:
        fp, info = _cached_fingerprint(ctx, cache, ctx.subject, base_src, role="subject")
    except WeightsError as exc:
        # The weights could not be analysed: never "clean" (exit code 2 unless a finding).
        ctx.file_issues.append(FileIssue(path=ctx.subject.resolved.repo_id, kind="weights",
                                         message=str(exc)))
        ctx.errors.append(f"weights: {exc}")
        return
    ctx.state.update(fingerprint=fp, subject_info=info, weights_analyzed=True)
    hit = cache.get(base_key, WEIGHTS_KEY) if cache is not None else None
    if hit is not None:
        ctx.state["base_fingerprint"] = hit.fingerprint
    else:
        ctx.state["base_fingerprint"] = fingerprint_weights(base_src)
        if cache is not None:
            cache.put(content_key=base_key, base_key=WEIGHTS_KEY,
                      repo_id=ctx.base.resolved.repo_id, base_repo_id=None,
                      fingerprint=ctx.state["base_fingerprint"], meta={})
    cand_fps: dict[str, Any] = {}
    cand_info: dict[str, dict[str, Any]] = {}
    for repo_id, cand in ctx.candidates.items():
        try:
            cand_fps[repo_id], cand_info[repo_id] = _cached_fingerprint(
                ctx, cache, cand, base_src, role=repo_id)
        except AuditorError as exc:
            ctx.errors.append(f"candidate {repo_id}: {exc}")
    ctx.state["candidate_fingerprints"] = cand_fps
    ctx.state["candidate_info"] = cand_info


def _cached_fingerprint(
    ctx: AuditContext, cache: Any, model: OpenModel, base_src: TensorSource, *, role: str
) -> tuple[Any, dict[str, Any]]:
    """The fingerprint from the content-keyed cache, else computed (and then cached).

    A cache hit reads no weight bytes and aligns nothing; a local model's weights are
    still opened (headers only) so the behavioural checks can run it if it ranks.
    """
    assert ctx.base is not None
    key, base_key = model.resolved.revision, ctx.base.resolved.revision
    hit = cache.get(key, base_key) if cache is not None else None
    if hit is None:
        fp, info = _fingerprint(ctx, model, base_src, role=role)
        if cache is not None:
            meta = {"aligned": bool(info.get("aligned")), "screen": info.get("screen"),
                    "adapter": bool(info.get("adapter")),
                    "resized": [i.model_dump(mode="json") for i in ctx.file_issues
                                if i.kind == "vocab_resize" and i.message.startswith(role)]}
            if model.resolved.local_dir is not None:
                meta["local_dir"] = str(model.resolved.local_dir)
            cache.put(content_key=key, base_key=base_key, repo_id=model.resolved.repo_id,
                      base_repo_id=ctx.base.resolved.repo_id, fingerprint=fp, meta=meta)
        return fp, info
    ctx.state["cache_hits"] = ctx.state.get("cache_hits", 0) + 1
    info = {"aligned": bool(hit.meta.get("aligned")), "screen": hit.meta.get("screen"),
            "cached": True}
    for issue in hit.meta.get("resized") or []:
        ctx.file_issues.append(FileIssue(**issue))
    # weights not at hand (a remote candidate): fetched later only if it ranks
    with contextlib.suppress(AuditorError):
        info["raw_source"] = weights_source(ctx, model, base_src)
    return hit.fingerprint, info


def weights_source(ctx: AuditContext, model: OpenModel, base_src: TensorSource) -> Any:
    """Full weights of ``model`` as a source: its files, or base + delta for an adapter."""
    if model.inventory.has_adapter and not model.inventory.safetensors:
        from auditor.weights.adapter_source import AdapterWeights
        from auditor.weights.lora import lora_deltas

        adapter_files = {n: p for n, p in model.files.items() if n.startswith("adapter_")}
        if not adapter_files:
            raise WeightsError("adapter files not fetched")
        deltas, _ = lora_deltas(adapter_files, base_src)
        src: Any = AdapterWeights(base_src, deltas)
    else:
        if not any(n.endswith(".safetensors") for n in model.files):
            raise WeightsError("weights not fetched")
        src = open_weights(model)
    ctx.state.setdefault("closers", []).append(src)
    return src


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
