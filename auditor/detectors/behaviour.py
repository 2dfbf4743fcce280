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
    open_weights,
)
from auditor.errors import AnalysisError, AuditorError
from auditor.schema import FileIssue

if TYPE_CHECKING:
    from auditor.analysis.modeling import ModelSpec
    from auditor.weights.base import TensorSource

MAX_HOMOLOGUES = 3


@dataclass(frozen=True)
class BehaviourModel(StageResult):
    spec: ModelSpec
    tokenizer: Any
    work: Any  # the working torch model, reloaded with each weight set in turn
    probes: Any  # auditor.analysis.probes.ProbeSet
    subject: TensorSource
    base: TensorSource


def build_behaviour(ctx: AuditContext) -> None:
    """Spec, tokenizer, working model and probes for the behavioural detectors."""
    subject_src = ctx.get(SubjectWeights).weights.raw_source
    base_src = ctx.get(BaseWeights).source
    nonfinite = ctx.find(NonFiniteTensors)
    if nonfinite is not None:
        # Running a model with NaN / inf weights measures nothing: the behavioural checks
        # say they could not run (the audit is incomplete; AUD501 says why).
        ctx.errors.append("behaviour: not run: the subject holds non-finite weights "
                          "(barrier, equivalence, protection and backdoor checks skipped)")
        return
    reason = None
    if subject_src is None:
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
    if reason is not None or subject_src is None:
        ctx.file_issues.append(FileIssue(path=ctx.subject.resolved.repo_id, kind="skipped",
                                         message=reason or ""))
        return
    ctx.provide(BehaviourModel(spec=spec, tokenizer=tokenizer, work=work, probes=probes,
                               subject=subject_src, base=base_src))


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
            picked.append(download_weights(ctx, repo_id, ref.revision))
        except AuditorError as exc:
            ctx.errors.append(f"homologue {repo_id}: {exc}")
    return picked


def download_weights(ctx: AuditContext, repo_id: str, revision: str | None) -> TensorSource:
    model = fetch_model(ctx.client, ctx.client.resolve(repo_id, revision=revision))
    source = open_weights(model)
    ctx.open_sources.append(source)
    return source


DETECTOR = Detector("behaviour", build_behaviour,
                    requires=(SubjectWeights, BaseWeights), provides=(BehaviourModel,))
