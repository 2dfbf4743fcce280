"""Merge resistance judged against the model's own unprotected equivalent.

A protected copy (MergeLock / PaRaMS-style rescaling, permutation and invertible mixes on
attention) computes the same function as its source, so the straight path between the
two starts and ends at the same loss: a re-upload or an honest fine-tune stays in the
source's basin (flat path), a protected copy was moved out of it (a wall halfway). This
is relative to the model's own loss, so it holds whatever the probes (off-task probes
make every fine-tune and every merge look bad, which hides an absolute merge test).

Probes are sampled from the model itself: they are the text it models well, so a merge
that keeps its function keeps their loss low and one that breaks it does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from auditor.analysis.barrier import function_distance
from auditor.analysis.modeling import ModelSpec, Source, as_source
from auditor.analysis.probes import ProbeSet

# Halfway between the model and its function-equivalent source, the predictions move
# at least this share of the way the source's own fine-tune moved them from its base. A
# re-upload or any copy in the source's basin gives exactly 0 (the midpoint is the
# source); a protected copy does not (0.13 on the factory's 2-layer models, where the
# untouched embeddings carry much of the function, far more on deeper ones)
RESISTANT_RATIO = 0.05


@dataclass(frozen=True)
class SourceComparison:
    ratio: float  # KL(source || midpoint) / KL(source || base)
    own_kl: float  # KL(source || model): ~0 for a function-preserving copy

    @property
    def resistant(self) -> bool:
        return self.own_kl <= 0.05 * max(self.reference, 1e-9) and self.ratio >= RESISTANT_RATIO

    reference: float = 0.0  # KL(source || base)


def compare_with_source(
    spec: ModelSpec,
    base: Source,
    model: Source,
    source: Source,
    *,
    probes: ProbeSet,
    work: torch.nn.Module,
) -> SourceComparison:
    """How far the midpoint of ``model`` and its function-equivalent ``source`` moves the
    predictions, against how far the source's own fine-tune moved them from the base."""
    m, s = as_source(model), as_source(source)
    mid = {k: 0.5 * (m.get(k).float() + s.get(k).float()) for k in m.keys() if k in s.keys()}
    ref = function_distance(spec, s, base, probes=probes, model=work)
    own = function_distance(spec, s, m, probes=probes, model=work)
    half = function_distance(spec, s, mid, probes=probes, model=work)
    return SourceComparison(ratio=half / max(ref, 1e-9), own_kl=own, reference=ref)


__all__ = ["RESISTANT_RATIO", "SourceComparison", "compare_with_source"]
