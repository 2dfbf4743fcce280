"""Merge-resistance and scale-cliff checks on factory models and a Trap²-trained model."""

from __future__ import annotations

import functools

import pytest
import torch

from auditor.analysis.modeling import spec_from_config
from auditor.analysis.probes import ProbeSet, build_probes
from auditor.analysis.protection import (
    ProtectionAssessment,
    assess_protection,
    assess_protection_detailed,
    scale_cliff_of,
)
from auditor.errors import AnalysisError
from tests.test_barrier import Trained, probes, trained


@functools.cache
def trap_model() -> dict[str, torch.Tensor]:
    from auditor_testkit.factory.protect_train import trap_finetune

    t = trained()
    model = trap_finetune(t.base_model, t.tokenizer, task="copy", seed=3)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def zoo() -> Trained:
    return trained()


@pytest.fixture()
def probe_set() -> ProbeSet:
    return probes()


@functools.cache
def plain_assessment() -> ProtectionAssessment:
    t = trained()
    return assess_protection_detailed(
        t.spec, t.base, t.copy_a, homologues=[t.copy_b, t.sort_c], probes=probes()
    )


def test_plain_finetune_is_not_merge_resistant(zoo: Trained) -> None:
    a = plain_assessment()
    info = a.info
    assert info.merge_resistant is False
    assert info.scale_cliff is False
    assert info.merged_loss_ratio is not None and info.merged_loss_ratio < 1.3
    scales = [s for s, _ in info.scale_curve]
    assert scales == sorted(scales) and 1.0 in scales and min(scales) <= 0.2
    # the curve at s = 1 is the model alone (measured once, not combined again)
    assert dict(info.scale_curve)[1.0] == a.own_loss
    # Every merge and sweep point was one pass over the probes, and the cost says so.
    assert a.cost is not None and a.cost.forward_passes > 0 and a.cost.seconds > 0
    assert set(a.reference_merged_losses) == {"linear", "ta0.75", "ta1"}


def test_protected_copy_is_merge_resistant(zoo: Trained, probe_set: ProbeSet) -> None:
    a = assess_protection_detailed(
        zoo.spec, zoo.base, zoo.protected, homologues=[zoo.copy_b, zoo.sort_c],
        probes=probe_set,
    )
    plain = plain_assessment()
    # Alone it is exactly as good as the model it protects ...
    assert a.own_loss == pytest.approx(plain.own_loss, abs=1e-3)
    # ... but every merge with a homologue is wrecked.
    assert a.info.merge_resistant is True
    assert a.info.merged_loss_ratio is not None and a.info.merged_loss_ratio > 1.5
    assert a.info.merged_loss_ratio > 1.4 * (plain.info.merged_loss_ratio or 0)


def test_single_homologue_uses_endpoint_reference(zoo: Trained, probe_set: ProbeSet) -> None:
    info = assess_protection(
        zoo.spec, zoo.base, zoo.copy_a, homologues=[zoo.copy_b], probes=probe_set,
        scales=(0.5, 1.0, 1.5),
    )
    assert info.merge_resistant is False
    assert [s for s, _ in info.scale_curve] == [0.5, 1.0, 1.5]
    # Outside the +-25% window nothing can be said about a cliff.
    assert info.scale_cliff is None


def test_trap_trained_model_shows_a_scale_cliff(zoo: Trained, probe_set: ProbeSet) -> None:
    trap = trap_model()
    a = assess_protection_detailed(
        zoo.spec, zoo.base, trap, homologues=[zoo.copy_b], probes=probe_set
    )
    plain = plain_assessment()
    assert a.info.scale_cliff is True
    assert plain.info.scale_cliff is False
    assert a.cliff_jump is not None and plain.cliff_jump is not None
    assert a.cliff_jump > 5 * plain.cliff_jump
    curve = dict(a.info.scale_curve)
    # The model itself still works at s = 1 (no worse than 1.5x its homologue's loss).
    assert curve[1.0] < 1.5 * max(a.base_loss, *a.homologue_losses)
    assert min(curve[0.8], curve[1.25]) > 1.3 * curve[1.0]


def test_scale_cliff_of_rules() -> None:
    smooth = [(0.5, 2.0), (0.8, 2.05), (1.0, 2.1), (1.25, 2.2), (1.5, 2.5)]
    assert scale_cliff_of(smooth)[0] is False
    cliff = [(0.5, 6.0), (0.8, 5.0), (1.0, 2.1), (1.25, 4.0), (1.5, 6.0)]
    assert scale_cliff_of(cliff)[0] is True
    assert scale_cliff_of([(0.5, 1.0), (1.5, 1.0)]) == (None, None)


def test_no_homologues_gives_unknown_resistance(zoo: Trained, probe_set: ProbeSet) -> None:
    info = assess_protection(zoo.spec, zoo.base, zoo.copy_a, homologues=[], probes=probe_set,
                             scales=(0.9, 1.0, 1.1))
    assert info.merge_resistant is None and info.merged_loss_ratio is None
    assert info.scale_cliff is False


def test_non_causal_models_are_refused() -> None:
    spec = spec_from_config({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    t = trained()
    with pytest.raises(AnalysisError, match="causal"):
        assess_protection(spec, {}, {}, homologues=[], probes=build_probes(
            tokenizer=t.tokenizer, n_sampled=0))
