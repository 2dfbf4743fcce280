"""Name normalization and full-model task vectors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from auditor.errors import ShapeMismatch
from auditor.weights.dict_sources import DictTensorSource
from auditor.weights.names import align_names, best_prefix_mapping, strip_peft_prefix
from auditor.weights.reader import open_model
from auditor.weights.task_vectors import delta_norms, model_deltas


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(4, 6, generator=g),
        "model.norm.weight": torch.ones(4),
        "lm_head.weight": torch.randn(10, 4, generator=g),
    }


def test_prefix_mapping_resolves_transformer_vs_model() -> None:
    base = ["model.layers.0.w", "model.layers.1.w", "model.norm.weight", "lm_head.weight"]
    model = ["transformer.layers.0.w", "transformer.layers.1.w", "transformer.norm.weight"]
    m = best_prefix_mapping(model, base)
    assert (m.src_prefix, m.dst_prefix) == ("transformer.", "model.")
    assert m.apply("transformer.layers.0.w") == "model.layers.0.w"
    assert m.apply("lm_head.weight") == "lm_head.weight"
    assert best_prefix_mapping(base, base).identity
    # A stripped top level (layers.0.w vs model.layers.0.w) is found too.
    m2 = best_prefix_mapping(["layers.0.w", "layers.1.w", "norm.weight"], base)
    assert m2.apply("layers.0.w") == "model.layers.0.w"
    assert strip_peft_prefix("base_model.model.model.x") == "model.x"


def test_deltas_exact_and_renamed() -> None:
    base = _base()
    model = {k: v + 0.5 for k, v in base.items()}
    renamed = {k.replace("model.", "transformer.", 1): v for k, v in model.items()}
    deltas, report = model_deltas(DictTensorSource(renamed), DictTensorSource(base))
    assert report.name_mapping == "'transformer.' -> 'model.'"
    assert sorted(deltas.keys()) == sorted(base)
    assert not report.only_model and not report.only_base and not report.skipped
    for name in deltas.keys():
        assert torch.allclose(deltas.delta(name), torch.full_like(base[name], 0.5))
    norms = delta_norms(deltas)
    assert norms["model.norm.weight"] == pytest.approx(1.0)


def test_vocab_resize_new_head_and_skips() -> None:
    base = _base()
    model = {k: v.clone() for k, v in base.items()}
    extra = torch.randn(3, 4)
    model["model.embed_tokens.weight"] = torch.cat([base["model.embed_tokens.weight"] + 1, extra])
    model["lm_head.weight"] = base["lm_head.weight"][:8] - 1  # shrunk vocabulary
    model["score.weight"] = torch.randn(2, 4)  # a new classification head
    model["model.layers.0.mlp.up_proj.weight"] = torch.randn(7, 4)  # not a vocab tensor
    del model["model.norm.weight"]
    deltas, report = model_deltas(DictTensorSource(model), DictTensorSource(base))
    assert report.resized == {"model.embed_tokens.weight": (10, 13), "lm_head.weight": (10, 8)}
    assert report.added_rows == {"model.embed_tokens.weight": 3}
    assert report.only_model == ("score.weight",)
    assert report.only_base == ("model.norm.weight",)
    assert set(report.skipped) == {"model.layers.0.mlp.up_proj.weight"}
    assert "(7, 4)" in report.skipped["model.layers.0.mlp.up_proj.weight"]
    assert deltas.shape("model.embed_tokens.weight") == (10, 4)
    assert torch.allclose(deltas.delta("model.embed_tokens.weight"), torch.ones(10, 4))
    assert deltas.shape("lm_head.weight") == (8, 4)
    assert torch.allclose(deltas.delta("lm_head.weight"), -torch.ones(8, 4))
    assert "model.layers.0.mlp.up_proj.weight" not in deltas.keys()


def test_nothing_comparable_raises() -> None:
    base = {"a.weight": torch.zeros(2, 3)}
    with pytest.raises(ShapeMismatch, match="no tensor of the model matches"):
        model_deltas(DictTensorSource({"a.weight": torch.zeros(3, 3)}), DictTensorSource(base))
    with pytest.raises(ShapeMismatch, match="share no tensor names"):
        model_deltas(DictTensorSource({"zzz": torch.zeros(1)}), DictTensorSource(base))


def test_tied_embeddings_model_side() -> None:
    base = _base()
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()  # base is tied
    model = {k: v + 1 for k, v in base.items() if k != "lm_head.weight"}
    deltas, report = model_deltas(DictTensorSource(model), DictTensorSource(base))
    assert report.tied == ("model: lm_head.weight tied to model.embed_tokens.weight",)
    assert "lm_head.weight" in deltas.keys() and not report.only_base
    assert torch.allclose(deltas.delta("lm_head.weight"), torch.ones(10, 4))


def test_tied_embeddings_from_config_and_untied() -> None:
    base = _base()  # lm_head differs from the embedding: not tied by data
    model = {k: v + 1 for k, v in base.items() if k != "lm_head.weight"}
    _, report = model_deltas(DictTensorSource(model), DictTensorSource(base))
    assert report.tied == () and report.only_base == ("lm_head.weight",)
    align = align_names(
        DictTensorSource(model), DictTensorSource(base), model_config={"tie_word_embeddings": True}
    )
    assert align.to_model["lm_head.weight"] == "model.embed_tokens.weight"
    # Base side tied (no lm_head in the base file), model carries its own head.
    base2 = {k: v for k, v in base.items() if k != "lm_head.weight"}
    model2 = dict(base)
    _, report2 = model_deltas(
        DictTensorSource(model2), DictTensorSource(base2), base_config={"tie_word_embeddings": True}
    )
    assert report2.tied == ("base: lm_head.weight tied to model.embed_tokens.weight",)


def test_deltas_from_files_mixed_dtypes(tmp_path: Path) -> None:
    base = _base()
    model = {k: (v + 0.25).to(torch.bfloat16) for k, v in base.items()}
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    save_file({k: v.half() for k, v in base.items()}, tmp_path / "b" / "model.safetensors")
    save_file(model, tmp_path / "m" / "model.safetensors")
    with open_model(tmp_path / "m") as m, open_model(tmp_path / "b") as b:
        deltas, report = model_deltas(m, b)
        assert len(report.compared) == 5
        for name in deltas.keys():
            expect = model[name].float() - base[name].half().float()
            assert torch.equal(deltas.delta(name), expect)
