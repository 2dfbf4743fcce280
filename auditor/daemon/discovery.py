"""Find derivatives of a watched base whatever their cards say, from a few percent of bytes.

Per crawl and watched base:

1. **Listing** (no weights): every new model with the base's library and ``model_type``
   tags, newest first, back to the discovery cursor (never older than the base itself),
   with its config and safetensors parameter count. Candidates whose architecture or size
   is not the base's stop here.
2. **Shape fingerprint**: the safetensors headers, read by range request, against the
   base's (``auditor.weights.sampling.compare_shapes``).
3. **Weight probe**: a fixed-seed sample of row chunks of a few tensors, read by range
   request within 1% of the candidate's bytes (headers included), tested for closeness to
   the base (``auditor.analysis.screening.probe``).

A candidate that passes is recorded with provenance ``discovered`` and its evidence (and the
card's claims), joins the base's family and is queued for a full audit. Servers that ignore
Range are handled by ``RangeFile``; a probe that would need to stream deep into a file is
"incomplete" and retried next crawl, never taken as unrelated for good.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from auditor.analysis.screening import ProbeResult, probe
from auditor.errors import AuditorError, RangeNotSupported
from auditor.hub.client import HubClient, RepoSummary, ResolvedRepo
from auditor.hub.range import open_range
from auditor.weights.sampling import (
    CountingSource,
    Layout,
    ShapeMatch,
    compare_shapes,
    plan_samples,
    plan_window,
    read_layout,
    read_samples,
)

log = logging.getLogger(__name__)

# Share of a candidate's weight bytes discovery may read before deciding (headers included).
PROBE_BUDGET = 0.01
# "A parameter count near the base's": a resized vocabulary or an extra head moves it a
# little; another width or depth moves it a lot. The shape fingerprint decides the rest.
PARAM_TOLERANCE = 0.25


@dataclass
class BaseProfile:
    """What discovery compares candidates with, read once per crawl."""

    resolved: ResolvedRepo
    model_type: str | None
    library: str | None
    parameters: int | None
    layout: Layout
    sources: dict[str, CountingSource]
    seed: int

    def close(self) -> None:
        for s in self.sources.values():
            s.close()

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.sources.values())


@dataclass
class Examination:
    """One candidate's way through the funnel."""

    repo_id: str
    sha: str | None
    stage: str  # prefilter | shape | probe
    related: bool | None  # None: could not decide (incomplete)
    reason: str
    bytes_read: int = 0
    total_bytes: int = 0
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.bytes_read / self.total_bytes if self.total_bytes else 0.0


def _seed_of(sha: str) -> int:
    return int(hashlib.sha256(sha.encode()).hexdigest()[:8], 16)


def _sources_for(client: HubClient, resolved: ResolvedRepo, *, max_stream_bytes: int | None
                 ) -> Callable[[str], CountingSource]:
    def opener(name: str) -> CountingSource:
        return CountingSource(open_range(client, resolved, name,
                                         max_stream_bytes=max_stream_bytes))
    return opener


def _read_config(client: HubClient, resolved: ResolvedRepo) -> dict[str, Any]:
    import json

    if "config.json" not in resolved.files:
        return {}
    try:
        with open_range(client, resolved, "config.json") as src:
            if src.size > 1 << 20:
                return {}
            data = json.loads(src.read(0, src.size))
    except (AuditorError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_base_profile(client: HubClient, base_repo_id: str, *, seed: int | None = None
                      ) -> BaseProfile:
    resolved = client.resolve(base_repo_id)
    config = _read_config(client, resolved)
    layout, sources = read_layout(_sources_for(client, resolved, max_stream_bytes=None),
                                  resolved.files)
    params = sum(info.numel for info in layout.tensors.values())
    library = "transformers" if "config.json" in resolved.files else None
    mt = config.get("model_type")
    return BaseProfile(resolved=resolved, model_type=mt if isinstance(mt, str) else None,
                       library=library, parameters=params, layout=layout, sources=sources,
                       seed=_seed_of(resolved.revision) if seed is None else seed)


def prefilter(profile: BaseProfile, summary: RepoSummary) -> str | None:
    """Why the listing alone rules the candidate out (None: read its header)."""
    if summary.repo_id == profile.resolved.repo_id:
        return "the base itself"
    if summary.files and not any(f.endswith(".safetensors") for f in summary.files):
        return "no safetensors weights"
    if summary.files and "adapter_config.json" in summary.files:
        return "an adapter (its adapter_config names its base)"
    if profile.model_type and summary.model_type and summary.model_type != profile.model_type:
        return f"other architecture ({summary.model_type})"
    if profile.model_type and summary.model_type is None and summary.files \
            and "config.json" not in summary.files:
        return "no config.json"
    if profile.parameters and summary.parameters:
        ratio = abs(summary.parameters - profile.parameters) / profile.parameters
        if ratio > PARAM_TOLERANCE:
            return f"{summary.parameters} parameters, base has {profile.parameters}"
    return None


def examine(client: HubClient, profile: BaseProfile, summary: RepoSummary, *,
            budget: float = PROBE_BUDGET) -> Examination:
    """Shape fingerprint and weight probe of one listed candidate."""
    exam = Examination(repo_id=summary.repo_id, sha=summary.sha, stage="prefilter",
                       related=False, reason="")
    reason = prefilter(profile, summary)
    if reason is not None:
        exam.reason = reason
        return exam
    resolved = client.resolve(summary.repo_id, revision=summary.sha)
    exam.sha = resolved.revision
    weight_files = {n: s for n, s in resolved.files.items() if n.endswith(".safetensors")}
    exam.total_bytes = sum(weight_files.values())
    limit = max(int(exam.total_bytes * budget), 1)
    exam.evidence["card"] = {"present": "README.md" in resolved.files,
                             "base_models": list(resolved.card.base_models),
                             "relation": resolved.card.relation}
    sources: dict[str, CountingSource] = {}
    try:
        layout, sources = read_layout(_sources_for(client, resolved, max_stream_bytes=limit),
                                      resolved.files)
        exam.stage = "shape"
        match = compare_shapes(profile.layout.tensors, layout.tensors)
        exam.evidence["shape"] = _shape_evidence(match)
        if not match.compatible():
            exam.reason = (f"tensor layout differs from the base's (score {match.score:.2f}, "
                           f"{len(match.mismatched)} shape mismatches)")
            return exam
        exam.stage = "probe"
        spent = sum(s.bytes_read for s in sources.values())
        streaming = any(getattr(s.inner, "range_ignored", False) for s in sources.values())
        if streaming:
            # The server ignores Range: only the start of the file is affordable.
            exam.evidence["range_ignored"] = True
            chunks = plan_window(match, profile.layout.tensors, layout, seed=profile.seed,
                                 end=limit)
        else:
            chunks = plan_samples(match, profile.layout.tensors, layout.tensors,
                                  seed=profile.seed, budget_bytes=limit - spent)
        if not chunks:
            exam.related, exam.reason = None, "no probe fits in the byte budget"
            return exam
        cand = read_samples(chunks, layout, sources, names=match.pairs, one_read=streaming)
        base = read_samples(chunks, profile.layout, profile.sources, one_read=streaming)
        result: ProbeResult = probe(cand, base, seed=profile.seed)
        exam.evidence["probe"] = result.as_dict()
        exam.related = result.related
        exam.reason = (f"relative distance {result.relative_distance:.3f} (independent "
                       f"model ~1), paired z {result.z:.1f}")
        return exam
    except RangeNotSupported as exc:
        exam.related, exam.reason = None, f"incomplete: {exc}"
        return exam
    finally:
        exam.bytes_read = sum(s.bytes_read for s in sources.values())
        exam.evidence["bytes_read"] = exam.bytes_read
        exam.evidence["total_bytes"] = exam.total_bytes
        for s in sources.values():
            s.close()


def _shape_evidence(match: ShapeMatch) -> dict[str, Any]:
    return {"score": round(match.score, 4), "matched": match.matched,
            "base_tensors": match.base_tensors, "resized_vocab": match.resized_vocab,
            "mismatched": match.mismatched[:10], "missing": match.missing[:10],
            "adapter_extra": match.adapter_extra, "other_extra": match.other_extra,
            "dtype_changes": match.dtype_changes}


@dataclass
class DiscoveryResult:
    examined: list[Examination] = field(default_factory=list)
    newest_created: datetime | None = None
    incomplete: int = 0

    @property
    def found(self) -> list[Examination]:
        return [e for e in self.examined if e.related]


def list_candidates(client: HubClient, profile: BaseProfile, *, since: datetime | None
                    ) -> Iterator[RepoSummary]:
    """New uploads of the base's architecture, newest first, back to ``since`` (never
    older than the base: nothing created before it can derive from it)."""
    created = profile.resolved.created_at
    filters = [f for f in (profile.library, profile.model_type) if f]
    for summary in client.list_new_models(filters=filters):
        when = summary.created_at
        if when is not None and since is not None and when <= since:
            return  # examined by an earlier crawl (the cursor is the newest it listed)
        if when is not None and created is not None and when < created:
            return  # older than the base: cannot derive from it
        yield summary


def discover(
    client: HubClient,
    profile: BaseProfile,
    *,
    since: datetime | None,
    skip: Callable[[RepoSummary], bool],
    on_found: Callable[[RepoSummary, Examination], None],
) -> DiscoveryResult:
    """List, pre-filter, fingerprint and probe new uploads; ``on_found`` each derivative.

    ``skip(summary)`` leaves out repos already known (listed through their card or the
    family tree this crawl, or recorded before)."""
    result = DiscoveryResult()
    for summary in list_candidates(client, profile, since=since):
        if result.newest_created is None and summary.created_at is not None:
            result.newest_created = summary.created_at
        if skip(summary):
            continue
        exam = examine(client, profile, summary)
        result.examined.append(exam)
        if exam.related is None:
            result.incomplete += 1
            log.warning("discovery incomplete repo=%s reason=%s", summary.repo_id, exam.reason)
        elif exam.related:
            log.info("discovered derivative repo=%s base=%s %s bytes=%d/%d", summary.repo_id,
                     profile.resolved.repo_id, exam.reason, exam.bytes_read, exam.total_bytes)
            on_found(summary, exam)
        else:
            log.debug("not a derivative repo=%s stage=%s reason=%s", summary.repo_id,
                      exam.stage, exam.reason)
    return result


__all__ = ["BaseProfile", "DiscoveryResult", "Examination", "discover", "examine",
           "list_candidates", "load_base_profile", "prefilter"]
