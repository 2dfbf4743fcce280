"""Merge-resistance checks: does this model wreck every merge it takes part in?

Protections such as MergeBarrier, MergeLock, PaRaMS and MergeGuard keep a model's own
function while moving its weights somewhere no merge with a homologue survives (large
function-preserving rescalings, random invertible mixes, spread-out perturbations). Trap²
instead trains the update so that only the full task vector works: base + s * tau falls off
a cliff for s away from 1, which is exactly what merging (s ~ lambda or 1/n) does.

Two measurements, both on the probe loss:

* merges: the model merged with each homologue (linear average and task arithmetic with
  lambda in ``lambdas``) against the same merges of the homologues among themselves (or,
  with a single homologue, against the worse of the two endpoint losses). The median ratio
  is ``merged_loss_ratio``; ``merge_resistant`` when it is high while the model alone is
  fine.
* a scale sweep of the task vector (``scale_curve``): ``scale_cliff`` when the loss jumps
  sharply within +-25% of s = 1, where a plain fine-tune changes smoothly and little.

Cost: one working model, (2 + |lambdas|) merges per homologue pair, |scales| sweep points;
each evaluation is one pass over the probes (reported through ``probes.cost``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import torch

from auditor.analysis.barrier import model_loss
from auditor.analysis.modeling import (
    ModelSpec,
    Source,
    as_source,
    build_model,
    combine_into,
    load_state_into,
)
from auditor.analysis.probes import CostReport, ProbeSet
from auditor.errors import AnalysisError
from auditor.schema import ProtectionInfo

DEFAULT_SCALES = (0.2, 0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)
# lambda 0.5 on two models equals the linear average, so start above it.
DEFAULT_LAMBDAS = (0.75, 1.0)
# Merged loss at least this many times the reference merge: the merge is wrecked.
MERGE_RATIO_THRESHOLD = 1.5
# The model alone is "fine" when its loss is at most this many times the reference
# single-model loss (median of base and homologues).
OWN_LOSS_TOLERANCE = 1.5
# Loss within +-25% of s = 1 rising this fraction above L(1): a cliff.
CLIFF_JUMP = 0.5
CLIFF_WINDOW = 0.25


@dataclass(frozen=True)
class ProtectionAssessment:
    """``ProtectionInfo`` plus the numbers behind it and the cost."""

    info: ProtectionInfo
    own_loss: float
    base_loss: float
    homologue_losses: tuple[float, ...]
    merged_losses: Mapping[str, float] = field(default_factory=dict)
    reference_merged_losses: Mapping[str, float] = field(default_factory=dict)
    cliff_jump: float | None = None
    cost: CostReport | None = None


def _merge_terms(
    method: str, base: Source, x: Source, y: Source
) -> list[tuple[float, Source]]:
    if method == "linear":
        return [(0.5, x), (0.5, y)]
    lam = float(method.removeprefix("ta"))
    # base + lam * (tau_x + tau_y) = (1 - 2 lam) base + lam x + lam y
    return [(1.0 - 2.0 * lam, base), (lam, x), (lam, y)]


def scale_cliff_of(curve: Sequence[tuple[float, float]]) -> tuple[bool | None, float | None]:
    """(cliff?, relative jump) of a scale curve: max within the window of (L(s) - L(1)) / L(1)."""
    at_one = [lo for s, lo in curve if abs(s - 1.0) < 1e-9]
    near = [lo for s, lo in curve if 1e-9 < abs(s - 1.0) <= CLIFF_WINDOW + 1e-9]
    if not at_one or not near:
        return None, None
    jump = (max(near) - at_one[0]) / max(at_one[0], 1e-6)
    return jump >= CLIFF_JUMP, jump


def assess_protection_detailed(
    spec: ModelSpec,
    base: Source,
    model: Source,
    *,
    homologues: Sequence[Source],
    probes: ProbeSet,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    scales: Sequence[float] = DEFAULT_SCALES,
    work: torch.nn.Module | None = None,
) -> ProtectionAssessment:
    """Merge and scale-sweep evidence of a merge protection (see the module docstring).

    ``homologues`` are other fine-tunes of the same base (ideally on the same or a nearby
    task). Without homologues only the scale sweep runs (``merge_resistant`` is None).
    Only causal LMs are supported (the merges are scored by next-token loss).
    """
    if not spec.is_causal:
        raise AnalysisError("protection checks need a causal LM (next-token probe loss)")
    start = probes.cost.snapshot()
    base_s, model_s = as_source(base), as_source(model)
    homs = [as_source(h) for h in homologues]
    work = work if work is not None else build_model(spec, model_s)

    def loss_of(terms: list[tuple[float, Source]]) -> float:
        combine_into(work, terms)
        return model_loss(spec, work, probes=probes)

    load_state_into(work, model_s)
    own = model_loss(spec, work, probes=probes)
    base_loss = loss_of([(1.0, base_s)])
    hom_losses = tuple(loss_of([(1.0, h)]) for h in homs)
    reference_single = statistics.median([base_loss, *hom_losses])
    fine = own <= OWN_LOSS_TOLERANCE * reference_single

    methods = ["linear", *(f"ta{lam:g}" for lam in lambdas)]
    merged: dict[str, float] = {}
    reference: dict[str, float] = {}
    ratios: list[float] = []
    for method in methods:
        pair_losses = [
            loss_of(_merge_terms(method, base_s, x, y)) for x, y in combinations(homs, 2)
        ]
        if pair_losses:
            reference[method] = statistics.mean(pair_losses)
        for i, h in enumerate(homs):
            lm = loss_of(_merge_terms(method, base_s, model_s, h))
            merged[f"{method}/h{i}"] = lm
            ref = reference.get(method, max(own, hom_losses[i]))
            ratios.append(lm / max(ref, 1e-6))
    ratio = statistics.median(ratios) if ratios else None
    resistant = None if ratio is None else bool(fine and ratio >= MERGE_RATIO_THRESHOLD)

    curve: list[tuple[float, float]] = []
    for s in sorted(scales):
        # s = 1 is the model itself: its loss is known (one pass less; at 1B on two CPU
        # cores each pass, a full combine and forward, costs tens of seconds)
        loss = own if s == 1.0 else loss_of([(1.0 - s, base_s), (float(s), model_s)])
        curve.append((float(s), loss))
    cliff, jump = scale_cliff_of(curve)
    if cliff is not None:
        cliff = bool(cliff and fine)

    info = ProtectionInfo(
        merge_resistant=resistant, scale_cliff=cliff, scale_curve=curve,
        merged_loss_ratio=ratio,
    )
    return ProtectionAssessment(
        info=info, own_loss=own, base_loss=base_loss, homologue_losses=hom_losses,
        merged_losses=merged, reference_merged_losses=reference, cliff_jump=jump,
        cost=probes.cost.snapshot().minus(start),
    )


def assess_protection(
    spec: ModelSpec,
    base: Source,
    model: Source,
    *,
    homologues: Sequence[Source],
    probes: ProbeSet,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    scales: Sequence[float] = DEFAULT_SCALES,
    work: torch.nn.Module | None = None,
) -> ProtectionInfo:
    """``ProtectionInfo`` of ``model`` (see ``assess_protection_detailed``). ``work``: the
    audit's working model, overwritten here (None: a model of its own is built, one more
    copy in memory: 2.5 GB at 1B)."""
    return assess_protection_detailed(
        spec, base, model, homologues=homologues, probes=probes, lambdas=lambdas,
        scales=scales, work=work,
    ).info
