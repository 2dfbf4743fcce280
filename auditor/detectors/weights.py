"""Stream the subject, its base and the candidates; align; fingerprint the task vectors."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from auditor.detectors.base import Detector
from auditor.detectors.context import (
    BASE_WEIGHTS_KEY,
    AuditContext,
    OpenModel,
    StageResult,
)
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
    source: TensorSource | None = None  # the weights compared (None when realigned)
    raw_source: TensorSource | None = None  # as published (adapters: base + their delta)
    adapter_exact: bool | None = None
    screen: Mapping[str, Any] | None = None  # the linear disguise screen's summary
    cached: bool = False  # from the fingerprint cache: no byte read, nothing aligned


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
    """Task-vector fingerprint of one model against the base, disguises undone first.

    One pass: the task vector's reads also feed the linear disguise screen
    (``auditor.analysis.disguise_screen``); only a suspect model is aligned (and read
    again), honest ones never are. Safetensors weights take the fused pass
    (``auditor.analysis.delta_print``: each pair read once in its stored dtype and walked in
    cache-sized blocks); any other source, the tensor-at-a-time one behind a ``ScreenTap``.
    """
    from auditor.analysis import delta_print
    from auditor.analysis.align import align_to_base
    from auditor.analysis.disguise_screen import ScreenTap, new_screen
    from auditor.analysis.fingerprint import compute_fingerprint
    from auditor.weights.adapter_source import AdapterWeights
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
        # an adapter is a full homologue: base + its delta, served tensor by tensor
        full = AdapterWeights(base_src, deltas)
        ctx.open_sources.append(full)
        return ModelWeights(fingerprint=compute_fingerprint(deltas),
                            adapter_exact=areport.exact, raw_source=full, source=full)
    src = open_weights(model)
    ctx.open_sources.append(src)
    config = model.config or (ctx.base.config if ctx.base else None)
    base_config = ctx.base.config if ctx.base else None
    if delta_print.fused_supported(src, base_src):
        screen = new_screen(config)
        deltas, report = model_deltas(src, base_src, model_config=model.config,
                                      base_config=base_config)
        fp = delta_print.fused_fingerprint(deltas, screen=screen)
    else:
        tap = ScreenTap(src, base_src, config=config)
        screen = tap.screen
        deltas, report = model_deltas(tap.subject, tap.base, model_config=model.config,
                                      base_config=base_config)
        fp = compute_fingerprint(deltas)
    disguised = False
    alignment = None
    chosen: TensorSource = src
    if screen.suspect:
        aligned = align_to_base(src, base_src, config=config)
        alignment = aligned.report
        # Ordinary fine-tuning also moves a few neuron scales; only a real disguise (a
        # permutation, or most units rescaled) justifies comparing the aligned weights.
        disguised = _disguise_detected(aligned.report, config or {})
        if disguised:
            chosen = aligned.source
            deltas, report = model_deltas(chosen, base_src, model_config=model.config,
                                          base_config=base_config)
            # The unaligned print is kept beside the aligned one: a merge that took this
            # model in as published combines its disguised weights (lineage fits that too).
            fp = replace(compute_fingerprint(deltas), raw=fp)
    for name, (old, new) in report.resized.items():
        ctx.file_issues.append(FileIssue(
            path=name, kind="vocab_resize",
            message=f"{role}: vocabulary resized from {old} to {new} rows; shared rows compared"))
    # The aligned overlay is not kept: it holds the realigned layers in float32 (a model's
    # worth at 1B+), and nothing after the fingerprint reads it.
    return ModelWeights(fingerprint=fp, aligned=disguised, alignment=alignment,
                        source=None if disguised else chosen, raw_source=src,
                        screen=screen.summary())


def _cached_fingerprint(
    ctx: AuditContext, model: OpenModel, base_src: TensorSource, *, role: str
) -> ModelWeights:
    """The fingerprint from the content-keyed cache, else computed (and then cached).

    A cache hit reads no weight bytes and aligns nothing; a local model's weights are
    still opened (headers only) so the behavioural checks can run it if it ranks.
    """
    assert ctx.base is not None
    cache = ctx.fp_cache
    key, base_key = model.resolved.revision, ctx.base.resolved.revision
    hit = cache.get(key, base_key) if cache is not None else None
    if hit is None:
        weights = _fingerprint(ctx, model, base_src, role=role)
        if cache is not None:
            meta: dict[str, Any] = {
                "aligned": weights.aligned, "screen": dict(weights.screen or {}),
                "adapter_exact": weights.adapter_exact,
                "resized": [i.model_dump(mode="json") for i in ctx.file_issues
                            if i.kind == "vocab_resize" and i.message.startswith(role)]}
            if model.resolved.local_dir is not None:
                meta["local_dir"] = str(model.resolved.local_dir)
            cache.put(content_key=key, base_key=base_key, repo_id=model.resolved.repo_id,
                      base_repo_id=ctx.base.resolved.repo_id, fingerprint=weights.fingerprint,
                      meta=meta)
        return weights
    ctx.cache_hits += 1
    for issue in hit.meta.get("resized") or []:
        ctx.file_issues.append(FileIssue(**issue))
    raw = None
    # weights not at hand (a remote candidate): fetched later only if it ranks
    with contextlib.suppress(AuditorError):
        raw = weights_source(ctx, model, base_src)
    return ModelWeights(fingerprint=hit.fingerprint, aligned=bool(hit.meta.get("aligned")),
                        screen=hit.meta.get("screen"), raw_source=raw, cached=True,
                        adapter_exact=hit.meta.get("adapter_exact"))


def weights_source(ctx: AuditContext, model: OpenModel, base_src: TensorSource) -> TensorSource:
    """Full weights of ``model`` as a source: its files, or base + delta for an adapter."""
    if model.inventory.has_adapter and not model.inventory.safetensors:
        from auditor.weights.adapter_source import AdapterWeights
        from auditor.weights.lora import lora_deltas

        adapter_files = {n: p for n, p in model.files.items() if n.startswith("adapter_")}
        if not adapter_files:
            raise WeightsError("adapter files not fetched")
        deltas, _ = lora_deltas(adapter_files, base_src)
        src: TensorSource = AdapterWeights(base_src, deltas)
    else:
        if not any(n.endswith(".safetensors") for n in model.files):
            raise WeightsError("weights not fetched")
        src = open_weights(model)
    ctx.open_sources.append(src)
    return src


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
    if ctx.base is None or not ctx.subject.files:
        ctx.skip("no safetensors or adapter weights")
        return
    from auditor.analysis.compute import bound_host_allocator
    from auditor.weights.resident import SHARED_BASES

    bound_host_allocator()  # freed blocks go back to the system, not to a fragmented heap
    base = ctx.base
    budget = ctx.settings.resident_base_bytes
    try:
        # Every model's task vector reads the base: held after its first read (stored
        # dtype), so it is read once from disk. Within ``resident_base_bytes`` it stays
        # held for the process's next audit of the same base (a worker's next derivative);
        # the behavioural stage evicts it when it needs the memory.
        base_src = SHARED_BASES.lease(_base_key(base), lambda: open_weights(base),
                                      budget=budget)
    except WeightsError as exc:
        raise AuditorError(f"base {ctx.base.resolved.repo_id}: {exc}") from exc
    ctx.open_sources.append(base_src)
    try:
        _detect_weights(ctx, base_src)
    finally:
        if budget <= 0:
            base_src.release()


def _base_key(base: OpenModel) -> tuple[object, ...]:
    """The base's content (its revision) and the files it is read from, as they are now."""
    files = []
    for name, path in sorted(base.files.items()):
        if name.startswith("adapter_"):
            continue
        try:
            st = path.stat()
        except OSError:
            return (base.resolved.revision, object())  # unreadable: never shared
        files.append((name, str(path), st.st_size, st.st_mtime_ns))
    return (base.resolved.revision, tuple(files))


def _detect_weights(ctx: AuditContext, base_src: TensorSource) -> None:
    from auditor.analysis.fingerprint import nonfinite_tensors

    assert ctx.base is not None
    try:
        subject = _cached_fingerprint(ctx, ctx.subject, base_src, role="subject")
    except WeightsError as exc:
        if isinstance(exc, NonFiniteWeights):
            ctx.provide(NonFiniteTensors(names=tuple(exc.tensors[:1000])))
        # The weights could not be analysed: never "clean" (exit code 2 unless a finding).
        ctx.file_issues.append(FileIssue(path=ctx.subject.resolved.repo_id, kind="weights",
                                         message=str(exc)))
        ctx.add_error(str(exc), kind=type(exc).__name__)
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
    ctx.provide(BaseWeights(source=base_src, fingerprint=_base_fingerprint(ctx, base_src)))
    candidates: dict[str, ModelWeights] = {}
    for repo_id, cand in ctx.candidates.items():
        try:
            candidates[repo_id] = _cached_fingerprint(ctx, cand, base_src, role=repo_id)
        except AuditorError as exc:
            ctx.add_error(f"candidate {repo_id}: {exc}", kind=type(exc).__name__)
    ctx.provide(CandidateWeights(by_repo=candidates))


def _base_fingerprint(ctx: AuditContext, base_src: TensorSource) -> Fingerprint:
    """The base's own weight fingerprint, cached by its content like every other."""
    from auditor.analysis import delta_print
    from auditor.analysis.fingerprint import fingerprint_weights

    assert ctx.base is not None
    cache, key = ctx.fp_cache, ctx.base.resolved.revision
    hit = cache.get(key, BASE_WEIGHTS_KEY) if cache is not None else None
    if hit is not None:
        return hit.fingerprint  # type: ignore[no-any-return]
    # the base's tensors are held by now (the subject's pass read them): one blockwise
    # pass over memory instead of several full float32 / float64 copies per tensor
    fp = (delta_print.fused_weights_fingerprint(base_src)
          if delta_print.fused_supported(base_src) else fingerprint_weights(base_src))
    if cache is not None:
        cache.put(content_key=key, base_key=BASE_WEIGHTS_KEY, repo_id=ctx.base.resolved.repo_id,
                  base_repo_id=None, fingerprint=fp, meta={})
    return fp


DETECTOR = Detector("weights", detect_weights,
                    provides=(SubjectWeights, BaseWeights, CandidateWeights, NonFiniteTensors))
