"""The working model and probe set the behavioural detectors share, built once per audit.

The ``behaviour`` stage builds them (barrier, equivalence, protection and backdoor require
its ``BehaviourModel``); it keeps at most two models' weights in memory besides the
working model (sources stream from disk) and skips, with a note in the report, what it
cannot run (adapters, unknown architectures, encoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from auditor.detectors.base import Detector
from auditor.detectors.context import AuditContext, StageResult, fetch_model
from auditor.detectors.lineage import Lineage
from auditor.detectors.weights import (
    BaseWeights,
    CandidateWeights,
    NonFiniteTensors,
    SubjectWeights,
    weights_source,
)
from auditor.errors import AnalysisError, AuditorError
from auditor.schema import FileIssue

if TYPE_CHECKING:
    from auditor.analysis.modeling import ModelSpec
    from auditor.weights.base import TensorSource

MAX_HOMOLOGUES = 3
# Under a reduced compute plan the protection check merges with this many: its passes
# grow with the homologue pairs (3 homologues: 30 passes, 2: 20).
REDUCED_HOMOLOGUES = 2


@dataclass(frozen=True)
class BehaviourModel(StageResult):
    spec: ModelSpec
    tokenizer: Any
    work: Any  # the working torch model, reloaded with each weight set in turn
    probes: Any  # auditor.analysis.probes.ProbeSet
    subject: TensorSource
    base: TensorSource
    # barrier points for this audit: Settings.barrier_points, fewer when the compute
    # budget cannot pay for them (a large model on the CPU)
    points: int = 11
    # the compute budget cut the probe set: the checks run at their reduced plan (the
    # protection check merges with fewer homologues)
    reduced: bool = False


def build_behaviour(ctx: AuditContext) -> None:
    """Spec, tokenizer, working model and probes for the behavioural detectors."""
    subject_src = ctx.get(SubjectWeights).weights.raw_source
    base_src = ctx.get(BaseWeights).source
    nonfinite = ctx.find(NonFiniteTensors)
    if nonfinite is not None:
        # Running a model with NaN / inf weights measures nothing: the behavioural checks
        # say they could not run (the audit is incomplete; AUD501 says why).
        ctx.add_error("not run: the subject holds non-finite weights (barrier, equivalence, "
                      "protection and backdoor checks skipped)", kind="NonFiniteWeights")
        return
    reason = None
    # An adapter runs as base + its delta, with the base's config and tokenizer.
    config = ctx.subject.config or (ctx.base.config if ctx.base else None)
    tok_model = ctx.subject if "tokenizer.json" in ctx.subject.files else ctx.base
    if subject_src is None:
        reason = "behavioural checks need the subject's weights"
    elif config is None or tok_model is None or "tokenizer.json" not in tok_model.files:
        reason = "behavioural checks need config.json and tokenizer.json"
    if reason is None:
        from auditor.analysis.compute import bound_host_allocator, resolve_device
        from auditor.analysis.modeling import build_model, load_tokenizer, spec_from_config
        from auditor.analysis.probes import build_probes

        bound_host_allocator()
        try:
            spec = spec_from_config(config or {})
            if not spec.is_causal:
                raise AnalysisError(f"{spec.task} models get weight checks only")
            assert tok_model is not None
            tokenizer = load_tokenizer(tok_model.folder)
            # built on the meta device, loaded once on AUDITOR_DEVICE
            work = build_model(spec, base_src, device=resolve_device(ctx.settings.device))
            # the base held since the weights stage (a worker keeps it for the family's
            # next audit) gives way to the working model and the resident subject
            release = getattr(base_src, "release", None)
            if callable(release):
                release()
            subject_src = _resident(ctx, subject_src, work)
            budget, points = _probe_plan(ctx, spec)
            probes = build_probes(tokenizer=tokenizer, sampler=work,
                                  probe_file=ctx.settings.probe_file, seed=0, **budget)
        except AnalysisError as exc:
            reason = str(exc)
    if reason is not None or subject_src is None:
        ctx.skip(reason or "no full weights")
        return
    ctx.provide(BehaviourModel(spec=spec, tokenizer=tokenizer, work=work, probes=probes,
                               subject=subject_src, base=base_src, points=points,
                               reduced=bool(budget)))


def _resident(ctx: AuditContext, source: TensorSource, work: Any) -> TensorSource:
    """The subject read once and held in the working model's dtype: every curve point,
    merge and scale of the behavioural checks combines it, and re-reading it from disk for
    each would multiply the audit's reads. Two copies in all (this one and the working
    model); a subject too large for that in the host budget is streamed instead."""
    from auditor.weights.resident import ResidentSource

    param = next(iter(work.parameters()), None)
    if param is None:
        return source
    nbytes = sum(p.numel() for p in work.parameters()) * param.element_size()
    budget = ctx.settings.host_memory_bytes
    if budget is not None and 2 * nbytes > budget:
        return source
    resident = ResidentSource(source, dtype=param.dtype)
    ctx.open_sources.append(resident)
    return resident


# Default probe set (build_probes): 16 sampled rows of 24 tokens, 32 texts of <= 32 tokens.
_FULL_PROBE_TOKENS = 16 * 24 + 32 * 32


def _probe_plan(ctx: AuditContext, spec: Any) -> tuple[dict[str, int], int]:
    """Probe-set size and barrier points for this audit: the full set and
    ``barrier_points`` when the compute budget allows it; fewer points, then fewer probe
    rows, when the model is large for the device (tokens x planned evaluations x
    2 x params <= the budget in settings)."""
    from auditor.analysis.compute import count_params, probe_budget, resolve_device

    k = max(1, ctx.settings.behaviour_top_k)
    n_params = count_params(spec.config)
    device = resolve_device(ctx.settings.device)
    floor = 48
    points = ctx.settings.barrier_points
    tokens = 0
    for points in sorted({ctx.settings.barrier_points, min(7, ctx.settings.barrier_points),
                          min(5, ctx.settings.barrier_points)}, reverse=True):
        # barrier curves (base + top-K), equivalence (2 per candidate), protection, backdoor
        planned = points * (1 + k) + 2 * k + 16 + 24
        tokens = probe_budget(n_params=n_params, device=device, planned_evaluations=planned,
                              cpu_flops=ctx.settings.cpu_probe_flops,
                              gpu_flops=ctx.settings.gpu_probe_flops, floor=1)
        if tokens >= floor:
            break
    tokens = max(tokens, floor)
    if tokens >= _FULL_PROBE_TOKENS and points == ctx.settings.barrier_points:
        return {}, points
    share = min(1.0, tokens / _FULL_PROBE_TOKENS)
    ctx.file_issues.append(FileIssue(
        path=ctx.subject.resolved.repo_id, kind="budget",
        message=f"behavioural checks on a reduced probe set (~{tokens} tokens per pass, "
                f"{points} barrier points, protection merges with {REDUCED_HOMOLOGUES} "
                "homologues) to fit the compute budget; set "
                "AUDITOR_DEVICE=cuda or raise AUDITOR_CPU_PROBE_FLOPS for full curves"))
    return ({"n_sampled": max(2, round(16 * share)), "max_texts": max(2, round(32 * share)),
             "sample_length": 24, "max_length": 32}, points)


def candidate_sources(ctx: AuditContext) -> dict[str, TensorSource]:
    """Downloaded candidates with full weights, by repo id."""
    return {repo_id: w.raw_source for repo_id, w in ctx.get(CandidateWeights).by_repo.items()
            if w.raw_source is not None}


def benign_homologues(
    ctx: AuditContext, *, relations: tuple[str, ...] = ("unrelated",)
) -> list[TensorSource]:
    """Homologues in ``relations`` to the subject: the reference for merges and averages.

    Local candidates first; when the comparison set came from the store (the daemon keeps
    only fingerprints), a few are downloaded, pinned to the audited revision.
    """
    entries = {e.repo_id: e for e in ctx.get(Lineage).result.entries}
    sources = candidate_sources(ctx)

    def suspected(repo_id: str) -> bool:
        # A homologue the store already holds a backdoor verdict against is no benign
        # reference: its payload would pass for "what relatives do".
        ref = ctx.homologues.get(repo_id)
        return bool(ref is not None and ref.backdoor is not None and ref.backdoor.suspected)

    picked = [src for repo, src in sorted(sources.items())
              if repo in entries and entries[repo].relation in relations
              # a re-upload would count the same model twice in the reference
              and not entries[repo].copy_of and not suspected(repo)][:MAX_HOMOLOGUES]
    # At most MAX_HOMOLOGUES download attempts per audit, shared by every stage that
    # asks: with hundreds of stored homologues an unreachable Hub must not cost one
    # timeout per homologue per stage.
    tried: dict[str, TensorSource | None] = ctx.__dict__.setdefault("_homologue_downloads", {})
    # Stored homologues, and candidates whose fingerprint came from the cache (their
    # weights were not read this time): both are fetched, pinned, only when needed here.
    # The candidates the audit was asked to compare with come first, then the store's.
    named = sorted((repo_id, c.resolved.revision) for repo_id, c in ctx.candidates.items()
                   if repo_id not in sources)
    stored = sorted((repo_id, ref.revision) for repo_id, ref in ctx.homologues.items()
                    if repo_id not in ctx.candidates)
    for repo_id, revision in [*named, *stored]:
        if len(picked) >= MAX_HOMOLOGUES:
            break
        entry = entries.get(repo_id)
        if repo_id in sources or entry is None or entry.relation not in relations \
                or entry.copy_of or suspected(repo_id):
            continue
        if repo_id in tried:
            if tried[repo_id] is not None:
                picked.append(tried[repo_id])  # type: ignore[arg-type]
            continue
        if len(tried) >= MAX_HOMOLOGUES:
            break
        try:
            tried[repo_id] = download_weights(ctx, repo_id, revision)
            picked.append(tried[repo_id])  # type: ignore[arg-type]
        except AuditorError as exc:
            tried[repo_id] = None
            ctx.add_error(f"homologue {repo_id}: {exc}", kind=type(exc).__name__)
    return picked


def download_weights(ctx: AuditContext, repo_id: str, revision: str | None) -> TensorSource:
    """A homologue's full weights (adapters: base + their delta), pinned to ``revision``."""
    model = fetch_model(ctx.client, ctx.client.resolve(repo_id, revision=revision))
    return weights_source(ctx, model, ctx.get(BaseWeights).source)


DETECTOR = Detector("behaviour", build_behaviour,
                    requires=(SubjectWeights, BaseWeights), provides=(BehaviourModel,))
