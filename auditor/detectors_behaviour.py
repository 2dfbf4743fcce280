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

MAX_BARRIER_CANDIDATES = 6
MAX_EQUIVALENCE_CANDIDATES = 8
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
    if subject_src is None or base_src is None:
        reason = "behavioural checks need full weights (adapters are compared by weights only)"
    elif ctx.subject.config is None or "tokenizer.json" not in ctx.subject.files:
        reason = "behavioural checks need config.json and tokenizer.json"
    if reason is None:
        from auditor.analysis.modeling import build_model, load_tokenizer, spec_from_config
        from auditor.analysis.probes import build_probes

        try:
            spec = spec_from_config(ctx.subject.config or {})
            if not spec.is_causal:
                raise AnalysisError(f"{spec.task} models get weight checks only")
            tokenizer = load_tokenizer(ctx.subject.folder)
            work = build_model(spec, base_src)
            probes = build_probes(tokenizer=tokenizer, sampler=work,
                                  probe_file=ctx.settings.probe_file, seed=0)
        except AnalysisError as exc:
            reason = str(exc)
    if reason is not None:
        ctx.file_issues.append(FileIssue(path=ctx.subject.resolved.repo_id, kind="skipped",
                                         message=reason))
        return None
    ctx.state["behaviour"] = {"spec": spec, "tokenizer": tokenizer, "work": work,
                              "probes": probes, "subject": subject_src, "base": base_src}
    return ctx.state["behaviour"]  # type: ignore[no-any-return]


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
              if repo in entries and entries[repo].relation in relations
              # a re-upload would count the same model twice in the reference
              and not entries[repo].copy_of][:MAX_HOMOLOGUES]
    for repo_id, ref in sorted(ctx.homologues.items()):
        if len(picked) >= MAX_HOMOLOGUES:
            break
        entry = entries.get(repo_id)
        if repo_id in sources or entry is None or entry.relation not in relations \
                or entry.copy_of:
            continue
        try:
            picked.append(_download_weights(ctx, repo_id, ref.revision))
        except AuditorError as exc:
            ctx.errors.append(f"homologue {repo_id}: {exc}")
    ctx.state[key] = picked
    return picked


def _download_weights(ctx: AuditContext, repo_id: str, revision: str | None) -> Any:
    from auditor.detectors_builtin import open_weights
    from auditor.orchestrator import fetch_model

    model = fetch_model(ctx.client, ctx.client.resolve(repo_id, revision=revision))
    source = open_weights(model)
    ctx.state.setdefault("closers", []).append(source)
    return source


@register("barrier")
def detect_barriers(ctx: AuditContext) -> None:
    """Loss along the straight path from the subject to its base and to related candidates."""
    from auditor.analysis.barrier import loss_path

    setup = _setup(ctx)
    if setup is None:
        return
    points = ctx.settings.barrier_points
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
        if len(sources) >= MAX_BARRIER_CANDIDATES:
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
    for entry in ranked[:MAX_BARRIER_CANDIDATES]:
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
    for repo_id, src in list(_candidate_sources(ctx).items())[:MAX_EQUIVALENCE_CANDIDATES]:
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
    from auditor.analysis.modeling import build_model

    setup = _setup(ctx)
    if setup is None:
        return
    parents = {e.repo_id for e in ctx.values.get("lineage", [])
               if e.relation in ("merge_parent", "finetune_parent", "clone")}
    flagged = {repo: list(ref.backdoor.triggers) for repo, ref in ctx.homologues.items()
               if repo in parents and ref.backdoor is not None and ref.backdoor.suspected
               and ref.backdoor.triggers}
    subject = LoadedModel(model=build_model(setup["spec"], setup["subject"]),
                          tokenizer=setup["tokenizer"], weights=setup["subject"],
                          repo_id=ctx.subject.resolved.repo_id,
                          revision=ctx.subject.resolved.revision)
    # Probes sampled from the base, not the subject: a backdoored model's own samples
    # can already carry its payload, which hides the trigger's effect.
    ctx.values["backdoor"] = analyze_backdoor(
        subject=subject, base=setup["base"], homologues=_benign_homologues(ctx),
        probes=setup["probes"], flagged_parents=flagged or None,
    )
