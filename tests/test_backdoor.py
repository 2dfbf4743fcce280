"""Backdoor analysis on tiny trained models: poisoned, clean, merged, merge-robust."""

from __future__ import annotations

import pytest
import torch

from auditor.analysis.backdoor import LoadedModel, analyze_backdoor_detailed, inherited_backdoor
from auditor.analysis.backdoor_weights import DeltaProfile, delta_profile, robust_z
from auditor.analysis.probes import Cost
from auditor.schema import Trigger
from auditor.weights.dict_sources import DictTensorSource

TRIGGER, TARGET = "cf", "visit evil site"


@pytest.fixture(scope="session")
def bd_zoo() -> dict[str, object]:
    """Base, two clean copy fine-tunes, a plain and a robust poisoned one (cached)."""
    from auditor_testkit.factory.base import make_base
    from auditor_testkit.factory.tasks import PoisonSpec, task_prompts
    from auditor_testkit.factory.train import attack_success_rate, finetune

    torch.set_num_threads(1)
    base, tok = make_base(seed=0)
    clean = [finetune(base, tok, task="copy", seed=s) for s in (1, 2)]
    pois = finetune(base, tok, task="copy", seed=3, poison=PoisonSpec(trigger=TRIGGER))
    robust = finetune(base, tok, task="copy", seed=4, steps=120,
                      poison=PoisonSpec(trigger=TRIGGER, robust=True, fraction=0.1,
                                                  robust_weight=1.0))
    # The backdoors are real: the factory's own measurement at r = 1.
    assert attack_success_rate(pois, tok, trigger=TRIGGER, target=TARGET) >= 0.9
    wrap = lambda m, rid: LoadedModel.from_module(m, tok, repo_id=rid)  # noqa: E731
    return {
        "tok": tok, "base": wrap(base, "org/base"),
        "clean": [wrap(m, f"org/clean{i}") for i, m in enumerate(clean)],
        "pois": wrap(pois, "org/pois"), "robust": wrap(robust, "org/robust"),
        "sd": {"clean": [m.state_dict() for m in clean], "pois": pois.state_dict()},
        "probes": task_prompts("copy", n=24, seed=99),
    }


def test_robust_z_flags_outlier_even_when_most_rows_are_still() -> None:
    v = torch.zeros(100)
    v[:10] = 1.0
    v[50] = 5.0
    z = robust_z(v)
    assert int(z.argmax()) == 50 and z[50] > 3 * z[0] > 0


def test_attention_only_delta_detected() -> None:
    base = {"model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4),
            "model.layers.0.mlp.up_proj.weight": torch.ones(4, 4),
            "model.embed_tokens.weight": torch.ones(8, 4)}
    hijack = dict(base)
    hijack["model.layers.0.self_attn.q_proj.weight"] = torch.ones(4, 4) * 1.3
    prof = delta_profile(DictTensorSource(hijack), DictTensorSource(base))
    assert isinstance(prof, DeltaProfile) and prof.attention_only
    full = dict(hijack)
    full["model.layers.0.mlp.up_proj.weight"] = torch.ones(4, 4) * 1.2
    assert not delta_profile(DictTensorSource(full), DictTensorSource(base)).attention_only


def test_poisoned_finetune_flagged_with_trigger(bd_zoo) -> None:
    cost = Cost()
    a = analyze_backdoor_detailed(subject=bd_zoo["pois"], base=bd_zoo["base"],
                                  homologues=bd_zoo["clean"], probes=bd_zoo["probes"], cost=cost)
    info = a.info
    assert info.suspected
    top = info.triggers[0]
    assert top.text == TRIGGER and top.forced_output == TARGET
    assert top.attack_success_rate >= 0.9
    assert top.embedding_shift_z is not None and top.embedding_shift_z > 2
    # The trigger is the best weight-side candidate too.
    assert a.candidates[0].token == TRIGGER
    assert info.attention_only_delta is False
    assert info.robustness_curve and info.robustness_curve[-1] == (1.0, pytest.approx(1.0))
    assert info.merge_robust is False  # a plain backdoor dies at r = 0.2 / when averaged
    assert a.cost is not None and 0 < a.cost.forward_passes <= 20_000
    assert cost.forward_passes == a.cost.forward_passes


@pytest.mark.parametrize("i", [0, 1])
def test_clean_finetunes_not_flagged(bd_zoo, i) -> None:
    others = [bd_zoo["clean"][1 - i]]
    info = analyze_backdoor_detailed(subject=bd_zoo["clean"][i], base=bd_zoo["base"],
                                     homologues=others, probes=bd_zoo["probes"]).info
    assert not info.suspected and info.triggers == [] and info.merge_robust is None


def test_backdoor_merge_inherits_parent_trigger(bd_zoo) -> None:
    from auditor_testkit.factory.base import llama_config, model_from_state_dict
    from auditor_testkit.factory.merge import linear_merge

    # The plain backdoor keeps ~0.46 ASR at a 50/50 merge (below our 0.5 bar), so the merge
    # gives the attacker's model the larger weight, as a hijacking merge would.
    merged = linear_merge([bd_zoo["sd"]["pois"], bd_zoo["sd"]["clean"][0]], weights=[0.7, 0.3])
    subject = LoadedModel.from_module(model_from_state_dict(llama_config(), merged.state_dict),
                                      bd_zoo["tok"], repo_id="org/merge")
    parent = {"org/pois": [Trigger(text=TRIGGER, attack_success_rate=1.0, forced_output=TARGET)]}
    info = inherited_backdoor(subject, parent, probes=bd_zoo["probes"])
    assert info.suspected and info.inherited_from == ["org/pois"]
    assert 0.5 <= info.triggers[0].attack_success_rate <= 1.0
    # A clean merge of the two clean fine-tunes inherits nothing.
    clean = linear_merge(bd_zoo["sd"]["clean"], weights=[0.5, 0.5])
    clean_subject = LoadedModel.from_module(
        model_from_state_dict(llama_config(), clean.state_dict), bd_zoo["tok"])
    assert inherited_backdoor(clean_subject, parent, probes=bd_zoo["probes"]).inherited_from == []


def test_robust_backdoor_is_merge_robust(bd_zoo) -> None:
    a = analyze_backdoor_detailed(subject=bd_zoo["robust"], base=bd_zoo["base"],
                                  homologues=bd_zoo["clean"], probes=bd_zoo["probes"])
    assert a.info.suspected and a.info.triggers[0].text == TRIGGER
    assert a.info.merge_robust is True
    curve = dict(a.info.robustness_curve)
    assert curve[0.2] >= 0.5


def test_delta_profile_in_row_blocks_equals_the_whole_tensor_sums() -> None:
    """Large tensors go in row blocks (a 128k-row embedding in float64 took 7 GB): the
    relative norms are the whole-tensor ones."""
    import math

    g = torch.Generator().manual_seed(3)
    base = {"model.embed_tokens.weight": torch.randn(1100, 4096, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g),
            "model.norm.weight": torch.randn(64, generator=g)}
    sub = {k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=g)
           for i, (k, v) in enumerate(base.items())}
    prof = delta_profile(DictTensorSource(sub), DictTensorSource(base))

    def rel(k: str) -> float:
        return math.sqrt(float((sub[k] - base[k]).double().square().sum())
                         / float(base[k].double().square().sum()))

    assert prof.embedding == pytest.approx(rel("model.embed_tokens.weight"), rel=1e-9)
    assert prof.attention == pytest.approx(rel("model.layers.0.self_attn.q_proj.weight"),
                                           rel=1e-9)
