"""Check a model card's origin claims against the weights: the facts lying-card rules read.

A card can lie by omission (no card), by naming another base, by calling a merge a
fine-tune, or by naming parents the weights do not show. This module gathers what is
needed to say so: a sampled weight probe of the subject against the audited base (range
reads, about 1% of the subject's bytes), whether the bases the card names belong to the
audited base's family, and which of the declared parents the lineage analysis compared and
found unrelated.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from auditor.analysis.screening import probe
from auditor.errors import AuditorError, RepoNotFound
from auditor.schema import LineageEntry, ProvenanceInfo
from auditor.weights.sampling import (
    CountingSource,
    compare_shapes,
    plan_samples,
    read_layout,
    read_samples,
)

if TYPE_CHECKING:
    from auditor.hub.client import HubClient, ResolvedRepo

log = logging.getLogger(__name__)

PROBE_BUDGET = 0.01
_PARENT_RELATIONS = ("merge_parent", "finetune_parent", "clone")
MAX_DECLARED_LOOKUPS = 5


def _opener(client: HubClient, resolved: ResolvedRepo, fetched: Mapping[str, Path] | None
            ) -> Callable[[str], CountingSource]:
    from auditor.hub.range import LocalRangeFile, open_range

    def open_one(name: str) -> CountingSource:
        # a file the audit has downloaded already is read where it lies: the same bytes
        # (pinned to the revision), without an HTTP request per sampled range
        if fetched is not None and name in fetched:
            return CountingSource(LocalRangeFile(fetched[name]))
        return CountingSource(open_range(client, resolved, name))

    return open_one


def probe_against_base(client: HubClient, subject: ResolvedRepo, base: ResolvedRepo, *,
                       subject_files: Mapping[str, Path] | None = None,
                       base_files: Mapping[str, Path] | None = None,
                       ) -> tuple[bool | None, float | None, float | None]:
    """(derived, relative distance, z) from a sampled probe; Nones when it cannot run.
    ``subject_files`` / ``base_files``: files already downloaded, read locally."""
    sources: list[CountingSource] = []
    try:
        s_layout, s_src = read_layout(_opener(client, subject, subject_files), subject.files)
        b_layout, b_src = read_layout(_opener(client, base, base_files), base.files)
        sources = [*s_src.values(), *b_src.values()]
        match = compare_shapes(b_layout.tensors, s_layout.tensors)
        if not match.compatible():
            return False, None, None
        spent = sum(s.bytes_read for s in s_src.values())
        seed = int(hashlib.sha256(base.revision.encode()).hexdigest()[:8], 16)
        chunks = plan_samples(match, b_layout.tensors, s_layout.tensors, seed=seed,
                              budget_bytes=max(int(s_layout.total_bytes * PROBE_BUDGET) - spent,
                                               0))
        if not chunks:
            return None, None, None
        result = probe(read_samples(chunks, s_layout, s_src, names=match.pairs),
                       read_samples(chunks, b_layout, b_src), seed=seed)
        return result.related, result.relative_distance, result.z
    except (AuditorError, ValueError) as exc:
        log.info("provenance probe of %s not possible: %s", subject.repo_id, exc)
        return None, None, None
    finally:
        for s in sources:
            s.close()


def _in_family(client: HubClient, declared: Sequence[str], base_id: str,
               family: Collection[str]) -> bool | None:
    if any(d == base_id or d in family for d in declared):
        return True
    unknown = False
    for d in list(declared)[:MAX_DECLARED_LOOKUPS]:
        try:
            card = client.resolve(d).card
        except RepoNotFound:
            continue  # a base that does not exist is not the audited base's family
        except AuditorError:
            unknown = True
            continue
        if base_id in card.base_models or any(b in family for b in card.base_models):
            return True
    return None if unknown else False


def card_claims(
    *,
    client: HubClient,
    subject: ResolvedRepo,
    base: ResolvedRepo | None,
    lineage: Sequence[LineageEntry],
    family: Collection[str] = (),
    found_by: Sequence[str] = (),
    probe_weights: bool = True,
    subject_files: Mapping[str, Path] | None = None,
    base_files: Mapping[str, Path] | None = None,
) -> ProvenanceInfo:
    """The subject's card claims next to what its weights show (``*_files``: downloaded
    files the probe reads in place)."""
    declared = list(subject.card.base_models)
    detected = [e.repo_id for e in lineage if e.relation in _PARENT_RELATIONS]
    # Only parents the analysis actually compared can be "not detected".
    compared_unrelated = {e.repo_id for e in lineage if e.relation == "unrelated"}
    derived = distance = z = None
    in_family = None
    if base is not None:
        if probe_weights and subject.files and base.files:
            derived, distance, z = probe_against_base(client, subject, base,
                                                      subject_files=subject_files,
                                                      base_files=base_files)
        if declared:
            in_family = _in_family(client, declared, base.repo_id,
                                   set(family) | set(detected))
    return ProvenanceInfo(
        base_repo_id=base.repo_id if base else None,
        found_by=list(found_by),
        card_present="README.md" in subject.files,
        declared_bases=declared,
        declared_relation=subject.card.relation,
        derived_from_base=derived,
        base_distance=distance,
        base_z=z,
        declared_in_family=in_family,
        detected_parents=detected,
        declared_not_detected=[d for d in declared if d in compared_unrelated],
    )


__all__ = ["card_claims", "probe_against_base"]
