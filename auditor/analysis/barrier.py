"""Merge-loss barriers (linear mode connectivity) and function distance.

``loss_path`` walks the straight line between two models' weights and measures the probe
loss at ``points`` evenly spaced alphas. Fine-tunes of one pretrained model stay in one
basin (near-zero barrier); independently trained models, and models "protected" with large
function-preserving rescalings, show a high barrier. A low barrier does not prove shared
ancestry and a high one does not disprove it when a protection is present: the rules combine
it with the weight-space evidence.

Causal LMs are scored by next-token cross-entropy on the probe tokens. Models without a
next-token objective (masked LMs, classifiers) are scored against the endpoints' own
predictions: L(alpha) = (1 - alpha) CE(p_A, p_alpha) + alpha CE(p_B, p_alpha), whose endpoint
values are the endpoints' entropies and whose excess over the straight line is the mixture
KL a merged model pays.

``function_distance`` is the mean KL between two models' predictive distributions on the
probes: ~0 for an obfuscated (function-preserving) copy however far apart its weights are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from auditor.analysis.modeling import (
    ModelSpec,
    Source,
    build_model,
    interpolate_into,
    load_state_into,
)
from auditor.analysis.probes import ProbeSet
from auditor.errors import AnalysisError
from auditor.schema import BarrierCurve

# Floor on the denominator of relative barriers: near-deterministic endpoints (entropy ~0)
# would otherwise turn a tiny absolute barrier into a huge relative one.
_MIN_SCALE = 0.05


# ------------------------------------------------------------------ predictions
def _scored_logits(
    spec: ModelSpec, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
    probes: ProbeSet,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits at the scored positions ``[M, V]`` and, for causal LMs, targets ``[M]``."""
    if spec.task == "encoder":
        raise AnalysisError(
            f"{spec.architecture} has no prediction head; loss-based analyses need one"
        )
    n_tokens = int(mask.sum())
    if spec.task == "masked_lm" and probes.mask_token_id is not None:
        # Mask every 6th real token (deterministic, ~15%) so the head predicts something
        # it cannot copy from its input.
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        hide = (pos % 6 == 3) & mask.bool()
        ids = ids.masked_fill(hide, probes.mask_token_id)
    else:
        hide = mask.bool()
    with probes.cost.forward(n_tokens):
        out = model(input_ids=ids, attention_mask=mask)
    logits = out.logits.float()
    if spec.task == "causal_lm":
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        return logits[:, :-1][valid], ids[:, 1:][valid]
    if spec.task == "sequence_classification":
        return logits, None
    return logits[hide], None


@torch.no_grad()
def model_log_probs(
    spec: ModelSpec, model: torch.nn.Module, *, probes: ProbeSet
) -> list[torch.Tensor]:
    """Per-batch log-probabilities at the scored positions (one ``[M_b, V]`` per batch)."""
    return [
        F.log_softmax(_scored_logits(spec, model, ids, mask, probes)[0], dim=-1)
        for ids, mask in probes.batches()
    ]


@torch.no_grad()
def model_loss(
    spec: ModelSpec,
    model: torch.nn.Module,
    *,
    probes: ProbeSet,
    references: Sequence[tuple[float, Sequence[torch.Tensor]]] = (),
) -> float:
    """Token-weighted mean probe loss.

    Causal LMs: next-token cross-entropy (``references`` ignored). Others: cross-entropy
    against the weighted reference predictions (``(weight, per-batch log-probs)`` pairs, as
    given by ``model_log_probs``), which is required for them.
    """
    total, count = 0.0, 0
    for b, (ids, mask) in enumerate(probes.batches()):
        logits, targets = _scored_logits(spec, model, ids, mask, probes)
        if logits.shape[0] == 0:
            continue
        if targets is not None:
            total += float(F.cross_entropy(logits, targets, reduction="sum"))
        else:
            if not references:
                raise AnalysisError(f"{spec.task} models need reference predictions")
            logp = F.log_softmax(logits, dim=-1)
            for w, ref in references:
                if w:
                    total += w * float(-(ref[b].exp() * logp).sum())
        count += logits.shape[0]
    if count == 0:
        raise AnalysisError("probe set has no scored positions")
    return total / count


# ------------------------------------------------------------------ barrier
def barrier_of(alphas: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """(barrier, relative barrier) of a loss curve whose ends are alpha 0 and 1."""
    l0, l1 = losses[0], losses[-1]
    excess = [lo - ((1 - a) * l0 + a * l1) for a, lo in zip(alphas, losses, strict=True)]
    barrier = max(0.0, max(excess))
    scale = max(0.5 * (l0 + l1), _MIN_SCALE)
    return barrier, barrier / scale


def loss_path(
    spec: ModelSpec,
    a: Source,
    b: Source,
    *,
    probes: ProbeSet,
    points: int = 11,
    other_repo_id: str = "",
    model: torch.nn.Module | None = None,
    start_loss: float | None = None,
) -> BarrierCurve:
    """Loss along ``(1 - alpha) a + alpha b`` for ``points`` alphas in [0, 1].

    The audit passes ``Settings.barrier_points``; the analysis never reads settings.

    ``model`` is an optional working model of ``spec`` to reuse (its weights are
    overwritten); otherwise one is built. Cost goes to ``probes.cost``. ``start_loss``:
    the loss of ``a`` alone on these probes when already measured (several curves from one
    subject share it; causal LMs only), so alpha 0 is not evaluated again.
    """
    if points < 3:
        raise ValueError("a barrier needs at least 3 points")
    alphas = [i / (points - 1) for i in range(points)]
    work = model if model is not None else build_model(spec, a)
    references: list[tuple[float, list[torch.Tensor]]] = []
    if not spec.is_causal:
        load_state_into(work, a)
        ref_a = model_log_probs(spec, work, probes=probes)
        load_state_into(work, b)
        ref_b = model_log_probs(spec, work, probes=probes)
    losses: list[float] = []
    for alpha in alphas:
        if alpha == 0.0 and start_loss is not None and spec.is_causal:
            losses.append(float(start_loss))
            continue
        interpolate_into(work, a, b, alpha)
        if not spec.is_causal:
            references = [(1.0 - alpha, ref_a), (alpha, ref_b)]
        losses.append(model_loss(spec, work, probes=probes, references=references))
    barrier, relative = barrier_of(alphas, losses)
    return BarrierCurve(
        other_repo_id=other_repo_id, alphas=alphas, losses=losses,
        barrier=barrier, relative_barrier=relative,
    )


@torch.no_grad()
def function_distance(
    spec: ModelSpec,
    a: Source,
    b: Source,
    *,
    probes: ProbeSet,
    model: torch.nn.Module | None = None,
    reference: Sequence[torch.Tensor] | None = None,
) -> float:
    """Mean KL(p_a || p_b) of the two models' predictive distributions on the probes.

    ``reference``: ``a``'s per-batch log-probabilities (``model_log_probs``) when already
    computed (one subject against several candidates), so ``a`` is not evaluated again.
    """
    work = model if model is not None else build_model(spec, a)
    if reference is not None:
        ref = list(reference)
    else:
        if model is not None:
            load_state_into(work, a)
        ref = model_log_probs(spec, work, probes=probes)
    load_state_into(work, b)
    total, count = 0.0, 0
    for logp_a, (ids, mask) in zip(ref, probes.batches(), strict=True):
        logp_b = F.log_softmax(_scored_logits(spec, work, ids, mask, probes)[0], dim=-1)
        total += float((logp_a.exp() * (logp_a - logp_b)).sum())
        count += logp_a.shape[0]
    if count == 0:
        raise AnalysisError("probe set has no scored positions")
    return max(0.0, total / count)
