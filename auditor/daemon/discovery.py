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

import torch

from auditor.analysis.screening import ProbeResult, probe, screen
from auditor.errors import AuditorError, RangeNotSupported
from auditor.hub.client import HubClient, RepoSummary, ResolvedRepo
from auditor.hub.range import open_range, stream_chunk
from auditor.weights.sampling import (
    Chunk,
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
# Share of a derivative's bytes its screening against homologues may read (probe included).
SCREEN_BUDGET = 0.05
# Homologues one screening compares with: the newest family members (and the card's
# parents); each is read once per crawl at the screening positions.
MAX_HOMOLOGUES = 16
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
    # repo id -> (layout, sources, base name -> its name): homologues opened this crawl.
    opened: dict[str, tuple[Layout, dict[str, CountingSource], dict[str, str]] | None] = \
        field(default_factory=dict)
    _plan: list[Chunk] | None = None
    _samples: dict[str | None, list[torch.Tensor] | None] = field(default_factory=dict)

    def close(self) -> None:
        for s in self.sources.values():
            s.close()
        for entry in self.opened.values():
            if entry is not None:
                for s in entry[1].values():
                    s.close()

    def screening_plan(self) -> list[Chunk]:
        if self._plan is None:
            own = compare_shapes(self.layout.tensors, self.layout.tensors)
            header = sum(h.data_start for h in self.layout.headers.values())
            self._plan = plan_samples(
                own, self.layout.tensors, self.layout.tensors, seed=self.seed + 1,
                budget_bytes=int(self.layout.total_bytes * SCREEN_BUDGET) - 2 * header,
                max_tensors=16, max_chunks=256)
        return self._plan

    def sample_of(self, client: HubClient, repo_id: str | None) -> list[torch.Tensor] | None:
        """The screening plan's values in the base (None) or a homologue, read once."""
        if repo_id not in self._samples:
            plan = self.screening_plan()
            if repo_id is None:
                self._samples[None] = read_samples(plan, self.layout, self.sources)
            else:
                opened = self.open_homologue(client, repo_id)
                values = None
                if opened is not None:
                    try:
                        values = read_samples(plan, opened[0], opened[1], names=opened[2])
                    except (AuditorError, ValueError) as exc:
                        log.info("homologue %s sample failed: %s", repo_id, exc)
                self._samples[repo_id] = values
        return self._samples[repo_id]

    def open_homologue(self, client: HubClient, repo_id: str
                       ) -> tuple[Layout, dict[str, CountingSource], dict[str, str]] | None:
        if repo_id not in self.opened:
            try:
                resolved = client.resolve(repo_id)
                layout, sources = read_layout(_sources_for(client, resolved,
                                                           max_stream_bytes=None),
                                              resolved.files)
                match = compare_shapes(self.layout.tensors, layout.tensors)
                self.opened[repo_id] = (layout, sources, match.pairs) \
                    if match.compatible() else None
            except (AuditorError, ValueError) as exc:
                log.info("homologue %s not readable for screening: %s", repo_id, exc)
                self.opened[repo_id] = None
        return self.opened[repo_id]

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
    bytes_transferred: int = 0
    retry: bool = False  # undecided for a reason that may pass (a server ignoring Range)

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
    from auditor.bounded import loads_json

    if "config.json" not in resolved.files:
        return {}
    try:
        with open_range(client, resolved, "config.json") as src:
            if src.size > 1 << 20:
                return {}
            data = loads_json(src.read(0, src.size), name="config.json")
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
            budget: float = PROBE_BUDGET,
            homologues: list[str] | None = None) -> Examination:
    """Shape fingerprint and weight probe of one listed candidate; a derivative is then
    screened against ``homologues`` (when given) within ``SCREEN_BUDGET`` of its bytes."""
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
            # The first read streamed the affordable prefix of the file (RangeFile keeps
            # it): the probe uses rows inside it.
            chunks = plan_window(match, profile.layout.tensors, layout, seed=profile.seed,
                                 end=limit - stream_chunk(limit))
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
        exam.reason = (f"distance {result.relative_distance:.3f} (an independently "
                       f"initialised model: {result.reference_distance:.3f}), "
                       f"paired z {result.z:.1f}")
        if exam.related and homologues and not streaming:
            exam.stage = "screen"
            exam.evidence["screening"] = _screen(
                client, profile, match, layout, sources, homologues=homologues,
                budget_bytes=int(exam.total_bytes * SCREEN_BUDGET)
                - sum(s.bytes_read for s in sources.values()))
        return exam
    except RangeNotSupported as exc:
        exam.related, exam.reason, exam.retry = None, f"incomplete: {exc}", True
        return exam
    finally:
        exam.bytes_read = sum(s.bytes_read for s in sources.values())
        # On the wire: a server ignoring Range may send a little more before the cut.
        exam.bytes_transferred = sum(getattr(s.inner, "bytes_transferred", s.bytes_read)
                                     for s in sources.values())
        exam.evidence["bytes_read"] = exam.bytes_read
        exam.evidence["total_bytes"] = exam.total_bytes
        for s in sources.values():
            s.close()


def _screen(client: HubClient, profile: BaseProfile, match: ShapeMatch, layout: Layout,
            sources: dict[str, CountingSource], *, homologues: list[str], budget_bytes: int
            ) -> dict[str, Any]:
    """Similarity and merge attribution of a derivative against homologues, from samples.

    One screening plan per base and crawl (positions from the base's shapes), so the base's
    and each homologue's samples are read once and reused for every candidate."""
    plan = profile.screening_plan()
    chunks = [c for c in plan if c.row < layout.tensors[match.pairs[c.tensor]].shape[0]]
    item = max((layout.tensors[match.pairs[c.tensor]].dtype_info.itemsize for c in chunks),
               default=4)
    while chunks and sum(c.length for c in chunks) * item > budget_bytes:
        chunks = chunks[: len(chunks) // 2]  # keep within this candidate's byte budget
    if len(chunks) < 8:
        return {"note": "no screening sample fits in the byte budget"}
    keep = {id(c) for c in chunks}
    subject = read_samples(chunks, layout, sources, names=match.pairs)
    base = [v for c, v in zip(plan, profile.sample_of(client, None), strict=True)
            if id(c) in keep]
    samples = {}
    for h in homologues[:MAX_HOMOLOGUES]:
        values = profile.sample_of(client, h)
        if values is not None:
            samples[h] = [v for c, v in zip(plan, values, strict=True) if id(c) in keep]
    result = screen(subject, base, samples, seed=profile.seed)
    return {**result.as_dict(), "homologues": sorted(samples)}


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
    homologues: list[str] | None = None,
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
        exam = examine(client, profile, summary, homologues=homologues)
        result.examined.append(exam)
        if exam.related is None:
            result.incomplete += 1
            log.log(logging.WARNING if exam.retry else logging.INFO,
                    "discovery undecided repo=%s reason=%s", summary.repo_id, exam.reason)
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
