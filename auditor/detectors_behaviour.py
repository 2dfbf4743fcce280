"""Detectors that run the models: loss barriers, function equivalence, protection, backdoors.

They share one working model and one probe set per audit (``_setup``), keep at most two
models' weights in memory besides the working model (sources stream from disk), and
skip, with a note in the report, what they cannot run (adapters, unknown architectures).
"""

from __future__ import annotations

import math
from typing import Any

from auditor import detectors_builtin  # noqa: F401  (its detectors run before these)
from auditor.detectors import register
from auditor.errors import AnalysisError, AuditorError
from auditor.orchestrator import AuditContext
from auditor.schema import FileIssue

# Barrier curves go to the top-K related candidates (Settings.behaviour_top_k); the
# equivalence check to twice as many, related ones first.
MAX_HOMOLOGUES = 3
# Function-equivalent copy: predictions nearly identical (mean KL in nats) while the
# weights sit far apart (relative to the candidate's own distance from the base).
EQUIVALENCE_KL = 1e-3
EQUIVALENCE_WEIGHT_DISTANCE = 0.5


def _setup(ctx: AuditContext) -> dict[str, Any] | None:
    """Spec, tokenizer, working model and probes, built once per audit (None: skipped)."""
    if "behaviour" in ctx.state:
        return ctx.state["behaviour"]  # type: ignore[no-any-return]
    ctx.state["behaviour"] = None
    info = ctx.state.get("subject_info", {})
    subject_src = info.get("raw_source")
    base_src = ctx.state.get("base_source")
    reason = None
    # An adapter runs as base + its delta, with the base's config and tokenizer.
    config = ctx.subject.config or (ctx.base.config if ctx.base else None)
    tok_model = ctx.subject if "tokenizer.json" in ctx.subject.files else ctx.base
    if subject_src is None or base_src is None:
        reason = "behavioural checks need the subject's weights"
    elif config is None or tok_model is None or "tokenizer.json" not in tok_model.files:
        reason = "behavioural checks need config.json and tokenizer.json"
    if reason is None:
        from auditor.analysis.compute import resolve_device
        from auditor.analysis.modeling import build_model, load_tokenizer, spec_from_config
        from auditor.analysis.probes import build_probes

        try:
            spec = spec_from_config(config or {})
            if not spec.is_causal:
                raise AnalysisError(f"{spec.task} models get weight checks only")
            assert tok_model is not None
            tokenizer = load_tokenizer(tok_model.folder)
            work = build_model(spec, base_src, device=resolve_device(ctx.settings.device))
            budget = _probe_plan(ctx, spec)
            probes = build_probes(tokenizer=tokenizer, sampler=work,
                                  probe_file=ctx.settings.probe_file, seed=0, **budget)
        except AnalysisError as exc:
            reason = str(exc)
    if reason is not None:
        ctx.file_issues.append(FileIssue(path=ctx.subject.resolved.repo_id, kind="skipped",
                                         message=reason))
        return None
    ctx.state["behaviour"] = {"spec": spec, "tokenizer": tokenizer, "work": work,
                              "probes": probes, "subject": subject_src, "base": base_src}
    return ctx.state["behaviour"]  # type: ignore[no-any-return]


# Default probe set (build_probes): 16 sampled rows of 24 tokens, 32 texts of <= 32 tokens.
_FULL_PROBE_TOKENS = 16 * 24 + 32 * 32


def _probe_plan(ctx: AuditContext, spec: Any) -> dict[str, int]:
    """Probe-set size for this audit: the full set when the compute budget allows it,
    fewer rows when the model is large for the device (tokens x planned evaluations x
    2 x params <= the budget in settings)."""
    from auditor.analysis.compute import count_params, probe_budget, resolve_device

    k = max(1, ctx.settings.behaviour_top_k)
    points = ctx.settings.barrier_points
    # barrier curves (base + top-K), equivalence (2 per candidate), protection, backdoor
    planned = points * (1 + k) + 2 * k + 16 + 24
    tokens = probe_budget(n_params=count_params(spec.config),
                          device=resolve_device(ctx.settings.device),
                          planned_evaluations=planned, cpu_flops=ctx.settings.cpu_probe_flops,
                          gpu_flops=ctx.settings.gpu_probe_flops)
    if tokens >= _FULL_PROBE_TOKENS:
        return {}
    share = tokens / _FULL_PROBE_TOKENS
    ctx.file_issues.append(FileIssue(
        path=ctx.subject.resolved.repo_id, kind="budget",
        message=f"behavioural checks on a reduced probe set (~{tokens} tokens per pass) "
                "to fit the compute budget; set AUDITOR_DEVICE=cuda or raise "
                "AUDITOR_CPU_PROBE_FLOPS for full curves"))
    return {"n_sampled": max(2, round(16 * share)), "max_texts": max(2, round(32 * share)),
            "sample_length": 24, "max_length": 32}


def _candidate_sources(ctx: AuditContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for repo_id, info in ctx.state.get("candidate_info", {}).items():
        if info.get("raw_source") is not None:
            out[repo_id] = info["raw_source"]
    return out


def _entry_map(ctx: AuditContext) -> dict[str, Any]:
    return {e.repo_id: e for e in ctx.values.get("lineage", [])}


def _benign_homologues(
    ctx: AuditContext, *, relations: tuple[str, ...] = ("unrelated",)
) -> list[Any]:
    """Homologues in ``relations`` to the subject: the reference for merges and averages.

    Local candidates first; when the comparison set came from the store (the daemon keeps
    only fingerprints), a few are downloaded, pinned to the audited revision, once per
    audit.
    """
    key = f"homologues:{','.join(relations)}"
    if key in ctx.state:
        return ctx.state[key]  # type: ignore[no-any-return]
    entries = _entry_map(ctx)
    sources = _candidate_sources(ctx)
    picked = [src for repo, src in sorted(sources.items())
              if repo in entries and entries[repo].relation in relations][:MAX_HOMOLOGUES]
    for repo_id, ref in sorted(ctx.homologues.items()):
        if len(picked) >= MAX_HOMOLOGUES:
            break
        entry = entries.get(repo_id)
        if repo_id in sources or entry is None or entry.relation not in relations:
            continue
        try:
            picked.append(_download_weights(ctx, repo_id, ref.revision))
        except AuditorError as exc:
            ctx.errors.append(f"homologue {repo_id}: {exc}")
    ctx.state[key] = picked
    return picked


def _download_weights(ctx: AuditContext, repo_id: str, revision: str | None) -> Any:
    from auditor.detectors_builtin import weights_source
    from auditor.errors import WeightsError
    from auditor.orchestrator import fetch_model

    model = fetch_model(ctx.client, ctx.client.resolve(repo_id, revision=revision))
    base = ctx.state.get("base_source")
    if base is None:
        raise WeightsError("no base weights open")
    # adapters are full homologues: base + their delta
    return weights_source(ctx, model, base)


@register("barrier")
def detect_barriers(ctx: AuditContext) -> None:
    """Loss along the straight path from the subject to its base and to related candidates."""
    from auditor.analysis.barrier import loss_path

    setup = _setup(ctx)
    if setup is None:
        return
    points = ctx.settings.barrier_points
    top_k = max(1, ctx.settings.behaviour_top_k)
    curves = []
    base_id = ctx.base.resolved.repo_id if ctx.base else "base"
    curves.append(loss_path(setup["spec"], setup["subject"], setup["base"],
                            probes=setup["probes"], points=points, other_repo_id=base_id,
                            model=setup["work"]))
    entries = _entry_map(ctx)
    sources = _candidate_sources(ctx)
    # Parents and clones known only by their stored fingerprint (daemon audits) are
    # downloaded for their curve: the report plots the barrier to every related model.
    for entry in sorted(entries.values(), key=lambda e: -abs(e.cosine)):
        if len(sources) >= top_k:
            break
        ref = ctx.homologues.get(entry.repo_id)
        if entry.relation == "unrelated" or entry.repo_id in sources or ref is None:
            continue
        try:
            sources[entry.repo_id] = _download_weights(ctx, entry.repo_id, ref.revision)
        except AuditorError as exc:
            ctx.errors.append(f"barrier {entry.repo_id}: {exc}")
    ranked = sorted((e for e in entries.values() if e.repo_id in sources),
                    key=lambda e: (e.relation == "unrelated", -abs(e.cosine)))
    for entry in ranked[:top_k]:
        curves.append(loss_path(setup["spec"], setup["subject"], sources[entry.repo_id],
                                probes=setup["probes"], points=points,
                                other_repo_id=entry.repo_id, model=setup["work"]))
    by_repo = {c.other_repo_id: c for c in curves}
    ctx.values["barriers"] = curves
    ctx.values["lineage"] = [
        e.model_copy(update={"barrier": by_repo[e.repo_id].barrier}) if e.repo_id in by_repo
        else e
        for e in ctx.values.get("lineage", [])
    ]


def _relative_weight_distance(subject: Any, candidate: Any, base: Any) -> float:
    """||subject - candidate|| / ||candidate - base||, streamed tensor by tensor."""
    num = den = 0.0
    shared = set(subject.keys()) & set(candidate.keys()) & set(base.keys())
    for name in sorted(shared):
        c = candidate.get(name)
        s, b = subject.get(name), base.get(name)
        if s.shape != c.shape or c.shape != b.shape:
            continue
        num += float((s - c).pow(2).sum())
        den += float((c - b).pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.inf


@register("equivalence")
def detect_function_equivalence(ctx: AuditContext) -> None:
    """Candidates whose predictions the subject reproduces while its weights are far apart."""
    from auditor.analysis.barrier import function_distance

    setup = _setup(ctx)
    if setup is None:
        return
    found: list[str] = []
    entries = _entry_map(ctx)
    sources = _candidate_sources(ctx)
    ranked = sorted(sources, key=lambda r: (
        r not in entries or entries[r].relation == "unrelated",
        -abs(entries[r].cosine) if r in entries else 0.0, r))
    for repo_id in ranked[:2 * max(1, ctx.settings.behaviour_top_k)]:
        src = sources[repo_id]
        kl = function_distance(setup["spec"], setup["subject"], src, probes=setup["probes"],
                               model=setup["work"])
        if kl > EQUIVALENCE_KL:
            continue
        if _relative_weight_distance(setup["subject"], src, setup["base"]) > (
            EQUIVALENCE_WEIGHT_DISTANCE
        ):
            found.append(repo_id)
    ctx.values["function_equivalent_to"] = found


@register("protection")
def detect_protection(ctx: AuditContext) -> None:
    """Is the subject merge-resistant (MergeLock/PaRaMS-style) or scale-trapped (Trap²)?"""
    from auditor.analysis.protection import assess_protection

    setup = _setup(ctx)
    if setup is None:
        return
    ctx.values["protection"] = assess_protection(
        setup["spec"], setup["base"], setup["subject"],
        # Any homologue but its own parents and copies: merging with a sibling on a related
        # task is exactly what a merger would do.
        homologues=_benign_homologues(ctx, relations=("unrelated", "related")),
        probes=setup["probes"],
    )


@register("backdoor")
def detect_backdoor(ctx: AuditContext) -> None:
    """Trigger candidates, behavioural confirmation, merge robustness, inheritance."""
    from auditor.analysis.backdoor import LoadedModel, analyze_backdoor
    from auditor.analysis.modeling import load_state_into

    setup = _setup(ctx)
    if setup is None:
        return
    parents = {e.repo_id for e in ctx.values.get("lineage", [])
               if e.relation in ("merge_parent", "finetune_parent", "clone")}
    flagged = {repo: list(ref.backdoor.triggers) for repo, ref in ctx.homologues.items()
               if repo in parents and ref.backdoor is not None and ref.backdoor.suspected
               and ref.backdoor.triggers}
    # The working model becomes the subject (loaded in place: no second model in memory).
    load_state_into(setup["work"], setup["subject"])
    subject = LoadedModel(model=setup["work"],
                          tokenizer=setup["tokenizer"], weights=setup["subject"],
                          repo_id=ctx.subject.resolved.repo_id,
                          revision=ctx.subject.resolved.revision)
    # Probes sampled from the base, not the subject: a backdoored model's own samples
    # can already carry its payload, which hides the trigger's effect.
    ctx.values["backdoor"] = analyze_backdoor(
        subject=subject, base=setup["base"], homologues=_benign_homologues(ctx),
        probes=setup["probes"], flagged_parents=flagged or None,
    )
