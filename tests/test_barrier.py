"""Loss barriers, function distance, model building and probes on tiny factory models."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from auditor.analysis.barrier import barrier_of, function_distance, loss_path, model_loss
from auditor.analysis.modeling import (
    ModelSpec,
    build_model,
    interpolate_into,
    load_spec,
    load_tokenizer,
    spec_from_config,
    with_task_vector_scaled,
)
from auditor.analysis.probes import ProbeSet, build_probes, probes_from_ids
from auditor.errors import AnalysisError
from auditor.weights.dict_sources import DictDeltaSource, DictTensorSource

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Trained:
    """Models shared by test_barrier and test_protection (trained once per process)."""

    spec: ModelSpec
    tokenizer: object
    base: StateDict
    other_base: StateDict
    copy_a: StateDict  # fine-tune of base on "copy"
    copy_b: StateDict  # homologue: same task, other seed
    sort_c: StateDict  # fine-tune of base on another task
    other_ft: StateDict  # fine-tune of the independently trained base
    protected: StateDict  # factory "protected copy" of copy_a (same function)
    base_model: torch.nn.Module


@functools.cache
def trained() -> Trained:
    torch.set_num_threads(1)
    from auditor_testkit.factory.base import make_base
    from auditor_testkit.factory.disguise import protect
    from auditor_testkit.factory.train import finetune

    base, tok = make_base(seed=0)
    other, _ = make_base(seed=1)

    def sd(m: torch.nn.Module) -> StateDict:
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    copy_a = sd(finetune(base, tok, task="copy", seed=1))
    spec = spec_from_config(base.config.to_dict())
    return Trained(
        spec=spec,
        tokenizer=tok,
        base=sd(base),
        other_base=sd(other),
        copy_a=copy_a,
        copy_b=sd(finetune(base, tok, task="copy", seed=2)),
        sort_c=sd(finetune(base, tok, task="sort", seed=3)),
        other_ft=sd(finetune(other, tok, task="copy", seed=1)),
        protected=dict(protect(copy_a, num_heads=base.config.num_attention_heads,
                               seed=5).state_dict),
        base_model=base,
    )


@functools.cache
def probes() -> ProbeSet:
    t = trained()
    return build_probes(tokenizer=t.tokenizer, sampler=t.base_model, seed=0)


@pytest.fixture(scope="session")
def zoo() -> Trained:
    return trained()


@pytest.fixture()
def probe_set() -> ProbeSet:
    return probes()


# ------------------------------------------------------------------ modeling
def test_spec_refuses_unknown_architectures_and_drops_remote_code() -> None:
    with pytest.raises(AnalysisError, match="unsupported model_type"):
        spec_from_config({"model_type": "phi3"})
    with pytest.raises(AnalysisError, match="unsupported architecture"):
        spec_from_config({"model_type": "llama", "architectures": ["EvilForCausalLM"]})
    spec = spec_from_config({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
        "auto_map": {"AutoModelForCausalLM": "evil.Model"}, "trust_remote_code": True,
    })
    assert spec.task == "causal_lm" and spec.is_causal
    assert "auto_map" not in spec.config and "trust_remote_code" not in spec.config
    assert spec_from_config({"model_type": "bert"}).task == "masked_lm"
    assert spec_from_config(
        {"model_type": "roberta", "architectures": ["RobertaForSequenceClassification"]}
    ).task == "sequence_classification"


def test_saved_repo_round_trip(zoo: Trained, tmp_path: Path) -> None:
    from auditor.weights.reader import open_model
    from auditor_testkit.factory.base import llama_config
    from auditor_testkit.factory.save import save_repo

    folder = save_repo(tmp_path, "org/copy-a", state_dict=zoo.copy_a, config=llama_config(),
                       tokenizer=zoo.tokenizer)
    spec = load_spec(folder)
    assert spec == zoo.spec
    tok = load_tokenizer(folder)
    assert tok("copy a b =")["input_ids"] == zoo.tokenizer("copy a b =")["input_ids"]
    source = open_model(folder)
    model = build_model(spec, source)
    reference = build_model(spec, zoo.copy_a)
    ids = torch.tensor([tok("copy a b c =")["input_ids"]])
    assert not model.training
    assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_load_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(AnalysisError, match=r"no config\.json"):
        load_spec(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(AnalysisError, match="malformed"):
        load_spec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(AnalysisError):
        load_spec(tmp_path)
    with pytest.raises(AnalysisError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_interpolation_and_task_vector_scaling_are_exact(zoo: Trained) -> None:
    model = build_model(zoo.spec, zoo.base)
    name = "model.layers.1.mlp.up_proj.weight"
    interpolate_into(model, zoo.copy_a, DictTensorSource(zoo.copy_b), 0.3)
    got = dict(model.named_parameters())[name]
    assert torch.allclose(got, 0.7 * zoo.copy_a[name] + 0.3 * zoo.copy_b[name], atol=1e-6)

    tau = {k: zoo.copy_a[k] - zoo.base[k] for k in zoo.base}
    with_task_vector_scaled(model, zoo.base, DictDeltaSource(tau), 1.4)
    expect = zoo.base[name] + 1.4 * tau[name]
    assert torch.allclose(dict(model.named_parameters())[name], expect, atol=1e-6)
    # The fine-tuned model itself as the tau source gives the same result.
    with_task_vector_scaled(model, zoo.base, zoo.copy_a, 1.4)
    assert torch.allclose(dict(model.named_parameters())[name], expect, atol=1e-5)


def test_missing_tensor_is_an_analysis_error(zoo: Trained) -> None:
    partial = {k: v for k, v in zoo.base.items() if "layers.1." not in k}
    with pytest.raises(AnalysisError, match="lack"):
        build_model(zoo.spec, partial)


# ------------------------------------------------------------------ probes
def test_probes_are_seeded_bounded_and_costed(zoo: Trained, tmp_path: Path) -> None:
    p1 = build_probes(tokenizer=zoo.tokenizer, sampler=zoo.base_model, seed=3, n_sampled=8,
                      max_length=12)
    p2 = build_probes(tokenizer=zoo.tokenizer, sampler=zoo.base_model, seed=3, n_sampled=8,
                      max_length=12)
    assert torch.equal(p1.input_ids, p2.input_ids)
    assert p1.input_ids.shape[1] <= 12
    assert p1.origins.count("sampled") == 8
    assert p1.cost.forward_passes > 0 and p1.cost.tokens > 0
    # Builtin English texts are mostly beyond the factory vocabulary / pretraining:
    # the sampler cannot model them, so they are dropped rather than diluting the loss.
    assert "builtin" not in p1.origins
    kept = build_probes(tokenizer=zoo.tokenizer, n_sampled=0)
    assert set(kept.origins) == {"builtin"}

    user = tmp_path / "probes.txt"
    user.write_text("# comment\ncopy a b c = a b c\nsort c b a = a b c\n")
    p3 = build_probes(tokenizer=zoo.tokenizer, sampler=zoo.base_model, probe_file=user,
                      use_builtin=False, n_sampled=2)
    assert p3.origins.count("file") == 2 and len(p3) == 4
    for ids, mask in p3.batches():
        assert bool(mask[:, -1].any())  # each batch trimmed to its longest row


# ------------------------------------------------------------------ barriers
def test_barrier_low_for_finetunes_of_one_base(zoo: Trained, probe_set: ProbeSet) -> None:
    before = probe_set.cost.snapshot()
    curve = loss_path(zoo.spec, zoo.copy_a, zoo.sort_c, probes=probe_set,
                      other_repo_id="org/sort")
    assert curve.other_repo_id == "org/sort"
    assert len(curve.alphas) == len(curve.losses) == 11
    assert curve.alphas[0] == 0.0 and curve.alphas[-1] == 1.0
    assert curve.relative_barrier < 0.05
    spent = probe_set.cost.snapshot().minus(before)
    assert spent.forward_passes == 11 * math.ceil(len(probe_set) / probe_set.batch_size)


def test_barrier_high_between_independent_bases(zoo: Trained, probe_set: ProbeSet) -> None:
    related = loss_path(zoo.spec, zoo.base, zoo.copy_a, probes=probe_set, points=7)
    unrelated = loss_path(zoo.spec, zoo.copy_a, zoo.other_ft, probes=probe_set, points=7)
    assert unrelated.relative_barrier > 0.3
    assert unrelated.barrier > 10 * max(related.barrier, 0.01)
    mid = unrelated.losses[3]
    assert mid > max(unrelated.losses[0], unrelated.losses[-1]) + 0.5


def test_protected_copy_keeps_function_but_has_a_barrier(
    zoo: Trained, probe_set: ProbeSet
) -> None:
    own = model_loss(zoo.spec, build_model(zoo.spec, zoo.protected), probes=probe_set)
    original = model_loss(zoo.spec, build_model(zoo.spec, zoo.copy_a), probes=probe_set)
    assert own == pytest.approx(original, abs=1e-3)
    # Same function (KL ~ 0) although the weights are far apart ...
    assert function_distance(zoo.spec, zoo.copy_a, zoo.protected, probes=probe_set) < 1e-4
    name = "model.layers.0.mlp.up_proj.weight"
    far = (zoo.protected[name] - zoo.copy_a[name]).norm() / zoo.copy_a[name].norm()
    assert far > 1.0
    # ... while a homologue differs in function, and the protected copy sits behind a
    # barrier that the unprotected original does not have.
    assert function_distance(zoo.spec, zoo.copy_a, zoo.copy_b, probes=probe_set) > 0.01
    plain = loss_path(zoo.spec, zoo.copy_a, zoo.copy_b, probes=probe_set, points=5)
    guarded = loss_path(zoo.spec, zoo.protected, zoo.copy_b, probes=probe_set, points=5)
    assert plain.relative_barrier < 0.05
    assert guarded.relative_barrier > 0.3


def test_barrier_of_straight_line_and_bump() -> None:
    assert barrier_of([0, 0.5, 1], [1.0, 1.5, 2.0]) == (0.0, 0.0)
    b, rel = barrier_of([0, 0.5, 1], [1.0, 3.5, 2.0])
    assert b == pytest.approx(2.0) and rel == pytest.approx(2.0 / 1.5)


def test_masked_lm_barrier_uses_endpoint_predictions() -> None:
    import transformers

    spec = spec_from_config({
        "model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 50,
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 32,
    })
    torch.manual_seed(0)
    a = transformers.BertForMaskedLM(spec.to_config()).state_dict()
    torch.manual_seed(1)
    b = transformers.BertForMaskedLM(spec.to_config()).state_dict()
    gen = torch.Generator().manual_seed(0)
    ps = probes_from_ids(torch.randint(5, 50, (6, 12), generator=gen).tolist())
    same = loss_path(spec, a, a, probes=ps, points=5)
    assert same.barrier == pytest.approx(0.0, abs=1e-5)
    # Endpoint losses are the endpoints' own prediction entropies (> 0).
    assert same.losses[0] > 0
    other = loss_path(spec, a, b, probes=ps, points=5)
    assert other.barrier > 0.0
    assert function_distance(spec, a, a, probes=ps) == pytest.approx(0.0, abs=1e-6)
    encoder = spec_from_config({"model_type": "bert", "architectures": ["BertModel"]})
    with pytest.raises(AnalysisError, match="prediction head"):
        model_loss(encoder, transformers.BertModel(encoder.to_config()), probes=ps)
