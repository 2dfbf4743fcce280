"""LoRA task vectors checked against peft's own merge_and_unload()."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from auditor.errors import NoWeights, UnsupportedAdapter
from auditor.weights.lora import lora_deltas, module_scaling, pattern_key
from auditor.weights.reader import open_model
from tests.weights_helpers import tiny_llama

peft = pytest.importorskip("peft")


def _adapter(tmp_path: Path, make_model: Any, **cfg: Any) -> tuple[Path, dict[str, torch.Tensor]]:
    """Save base + adapter (random nonzero B) and return peft's merged state dict."""
    base = make_model()
    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(make_model(), peft.LoraConfig(**cfg))
        torch.manual_seed(123)
        for name, p in model.named_parameters():
            if any(s in name for s in ("lora_B", "lora_embedding_B", "modules_to_save")):
                torch.nn.init.normal_(p, std=0.5)
            if "lora_magnitude_vector" in name:
                p.data.mul_(1.5)
        model.save_pretrained(tmp_path / "adapter")
        merged = model.merge_and_unload().state_dict()
    return tmp_path / "adapter", merged


def _check(adapter: Path, base_dir: Path, merged: dict[str, torch.Tensor]) -> Any:
    with open_model(base_dir) as base:
        deltas, report = lora_deltas(adapter, base)
        assert deltas.keys()
        for name in base.keys():
            expect = merged[name].float()
            got = base.get(name) + (deltas.delta(name) if name in deltas.keys() else 0)
            assert torch.allclose(got, expect, atol=1e-5), name
            assert name in deltas.keys() or torch.equal(base.get(name), expect), name
    return report


def _llama() -> Any:
    return tiny_llama(seed=0)


def test_plain_lora(tmp_path: Path) -> None:
    adapter, merged = _adapter(
        tmp_path, _llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    report = _check(adapter, tmp_path / "base", merged)
    assert report.exact and report.reason is None and not report.unmatched
    assert len(report.modules) == 6
    assert set(report.scaling.values()) == {2.0}


def test_rslora(tmp_path: Path) -> None:
    adapter, merged = _adapter(
        tmp_path, _llama, r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "o_proj"]
    )
    report = _check(adapter, tmp_path / "base", merged)
    assert report.use_rslora and set(report.scaling.values()) == {4.0}


def test_rank_and_alpha_patterns(tmp_path: Path) -> None:
    adapter, merged = _adapter(
        tmp_path,
        _llama,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 6},
        alpha_pattern={"layers.0.self_attn.q_proj": 3},
    )
    report = _check(adapter, tmp_path / "base", merged)
    assert report.ranks["model.layers.0.self_attn.v_proj.weight"] == 2
    assert report.ranks["model.layers.1.mlp.up_proj.weight"] == 6
    assert report.scaling["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.75)
    assert report.scaling["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(2.0)


def test_modules_to_save_and_embedding_lora(tmp_path: Path) -> None:
    adapter, merged = _adapter(
        tmp_path,
        _llama,
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    report = _check(adapter, tmp_path / "base", merged)
    assert report.whole == ("lm_head.weight",)
    assert "model.embed_tokens.weight" in report.modules


def test_fan_in_fan_out_gpt2(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2() -> Any:
        torch.manual_seed(0)
        return GPT2LMHeadModel(
            GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)
        )

    adapter, merged = _adapter(
        tmp_path, gpt2, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True
    )
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    report = _check(adapter, tmp_path / "base", merged)
    assert len(report.modules) == 2


@pytest.mark.parametrize("fifo", [False, True])
def test_dora_exact_and_flagged(tmp_path: Path, fifo: bool) -> None:
    if fifo:
        from transformers import GPT2Config, GPT2LMHeadModel

        def make() -> Any:
            torch.manual_seed(0)
            cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)
            return GPT2LMHeadModel(cfg)

        targets = {"target_modules": ["c_attn"], "fan_in_fan_out": True}
        name = "transformer.h.0.attn.c_attn.weight"
    else:
        make = _llama
        targets = {"target_modules": ["v_proj"]}
        name = "model.layers.0.self_attn.v_proj.weight"
    adapter, merged = _adapter(tmp_path, make, r=4, lora_alpha=8, use_dora=True, **targets)
    # Default: peft's magnitude rescaling applied with the base weight, exact.
    report = _check(adapter, tmp_path / "base", merged)
    assert report.exact and len(report.dora) == 2
    with open_model(tmp_path / "base") as base:
        deltas, approx = lora_deltas(adapter, base, dora="approximate")
        assert not approx.exact and "DoRA" in (approx.reason or "")
        # B @ A alone misses the magnitude rescaling: visibly not the merged weight.
        assert not torch.allclose(base.get(name) + deltas.delta(name), merged[name], atol=1e-3)
        with pytest.raises(UnsupportedAdapter, match="DoRA"):
            lora_deltas(adapter, base, dora="skip")


def test_pattern_key_semantics() -> None:
    pats = {"v_proj": 2, "layers.1.q_proj": 3}
    assert pattern_key(pats, "model.layers.0.self_attn.v_proj") == "v_proj"
    assert pattern_key(pats, "model.layers.0.self_attn.xv_proj") is None  # must start a component
    assert pattern_key(pats, "model.layers.1.q_proj") == "layers.1.q_proj"
    r, alpha, s = module_scaling({"r": 8, "lora_alpha": 16, "rank_pattern": pats}, "a.v_proj")
    assert (r, alpha, s) == (2, 16.0, 8.0)


def test_adapter_errors(tmp_path: Path) -> None:
    with open_model(_save_base(tmp_path)) as base:
        with pytest.raises(NoWeights, match=r"adapter_config\.json"):
            lora_deltas(tmp_path, base)
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
        (tmp_path / "adapter_model.safetensors").write_bytes(b"")
        with pytest.raises(UnsupportedAdapter, match="IA3"):
            lora_deltas(tmp_path, base)
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
        from safetensors.torch import save_file

        save_file(
            {"base_model.model.nothing.here.lora_A.weight": torch.zeros(2, 3),
             "base_model.model.nothing.here.lora_B.weight": torch.zeros(3, 2)},
            tmp_path / "adapter_model.safetensors",
        )  # fmt: skip
        with pytest.raises(UnsupportedAdapter, match="wrong base"):
            lora_deltas(tmp_path, base)


def _save_base(tmp_path: Path) -> Path:
    _llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"
