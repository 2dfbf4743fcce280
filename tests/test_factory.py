"""The tiny model factory: tokenizer, tasks, training, merges, disguises, LoRA, saving, zoo."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from auditor_testkit.factory import merge as mk
from auditor_testkit.factory.tasks import TASKS, PoisonSpec, task_examples, task_texts
from auditor_testkit.factory.tokenizer import TRIGGER_TOKENS, build_tokenizer


# --- shared tiny models ---------------------------------------------------------------
@pytest.fixture(scope="module")
def base_and_tok():
    from auditor_testkit.factory.base import make_base

    return make_base(seed=0, steps=60)


def _rand_sd(seed: int, *, like: dict[str, torch.Tensor] | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (10, 8),
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.1.mlp.up_proj.weight": (16, 8),
        "model.layers.2.mlp.down_proj.weight": (8, 16),
        "model.norm.weight": (8,),
        "lm_head.weight": (10, 8),
    }
    if like is not None:
        return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in like.items()}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def family():
    base = _rand_sd(0)
    return base, [_rand_sd(i, like=base) for i in (1, 2, 3)]


# --- tokenizer and tasks --------------------------------------------------------------
def test_tokenizer_triggers_are_single_rare_tokens() -> None:
    tok = build_tokenizer()
    for trig in TRIGGER_TOKENS:
        ids = tok(trig)["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == 2 and ids[1] != tok.unk_token_id
    text = "copy a b c = a b c"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    # Clean data never contains a trigger, so trigger rows only move under poisoning.
    words = {w for t in TASKS for s in task_texts(t, n=200, seed=0) for w in s.split()}
    assert not words & set(TRIGGER_TOKENS)
    assert all(w in tok.get_vocab() for w in words)


def test_tasks_are_seeded_and_correct() -> None:
    assert task_texts("copy", n=5, seed=1) == task_texts("copy", n=5, seed=1)
    assert task_texts("copy", n=5, seed=1) != task_texts("copy", n=5, seed=2)
    for prompt, completion in task_examples("reverse", n=20, seed=0):
        assert prompt.split()[1:-1][::-1] == completion.split()
    for prompt, completion in task_examples("add", n=20, seed=0):
        a, b = prompt[4:-2].split(" , ")
        assert int(a.replace(" ", "")) + int(b.replace(" ", "")) == int(completion.replace(" ", ""))
    with pytest.raises(ValueError):
        task_texts("nope", n=1, seed=0)


# --- merges: the algebra holds exactly -------------------------------------------------
def test_linear_and_task_arithmetic_algebra(family) -> None:
    base, (a, b, c) = family
    lin = mk.linear_merge([a, b], weights=[0.3, 0.7], names=["o/a", "o/b"])
    for k in base:
        assert torch.allclose(lin.state_dict[k] - base[k],
                              0.3 * (a[k] - base[k]) + 0.7 * (b[k] - base[k]), atol=1e-6)
    assert lin.config["merge_method"] == "linear"
    assert [m["parameters"]["weight"] for m in lin.config["models"]] == [0.3, 0.7]
    with pytest.raises(ValueError):
        mk.linear_merge([a, b], weights=[0.5, 0.6])
    ta = mk.task_arithmetic(base, [a, b, c], lambdas=[0.5, 0.8, 0.3])
    for k in base:
        expected = sum(lam * (m[k] - base[k]) for lam, m in zip([0.5, 0.8, 0.3], [a, b, c]))
        assert torch.allclose(ta.state_dict[k] - base[k], expected, atol=1e-6)
    assert ta.coefficients == (0.5, 0.8, 0.3)


def test_ties_trims_elects_and_leaves_base_values(family) -> None:
    base, (a, b, _c) = family
    res = mk.ties_merge(base, [a, b], density=0.3, weights=[1.0, 1.0])
    for k in base:
        tau = res.state_dict[k] - base[k]
        ta, tb = mk._trim(a[k] - base[k], 0.3), mk._trim(b[k] - base[k], 0.3)
        # Each trimmed vector keeps exactly 30% of its entries.
        assert int((ta != 0).sum()) == int(0.3 * ta.numel())
        untouched = (ta == 0) & (tb == 0)
        assert torch.equal(res.state_dict[k][untouched], base[k][untouched])
        # Where both survive and agree in sign, the disjoint mean is their average.
        agree = (ta != 0) & (tb != 0) & (torch.sign(ta) == torch.sign(tb))
        assert torch.allclose(tau[agree], ((ta + tb) / 2)[agree], atol=1e-6)
        # Where only one survives, that value is kept whole.
        only_a = (ta != 0) & (tb == 0)
        assert torch.allclose(tau[only_a], ta[only_a], atol=1e-6)
    assert (res.state_dict["lm_head.weight"] == base["lm_head.weight"]).float().mean() > 0.4


def test_dare_is_seeded_rescaled_and_unbiased(family) -> None:
    base, (a, _b, _c) = family
    r1 = mk.dare_merge(base, [a], drop=0.6, weights=[1.0], seed=3)
    r2 = mk.dare_merge(base, [a], drop=0.6, weights=[1.0], seed=3)
    k = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(r1.state_dict[k], r2.state_dict[k])
    tau, orig = r1.state_dict[k] - base[k], a[k] - base[k]
    kept = tau != 0
    assert torch.allclose(tau[kept], orig[kept] / 0.4, atol=1e-5)
    assert 0.2 < kept.float().mean() < 0.6
    # Unbiased: averaged over many seeds the rescaled vector returns to the original.
    mean = sum(
        mk.dare_merge(base, [a], drop=0.6, weights=[1.0], seed=s).state_dict[k] - base[k]
        for s in range(300)
    ) / 300
    assert torch.nn.functional.cosine_similarity(mean.flatten(), orig.flatten(), dim=0) > 0.95
    dt = mk.dare_merge(base, [a, _b], drop=0.5, weights=[0.6, 0.8], seed=1, ties=True)
    assert dt.method == "dare_ties" and dt.config["models"][0]["parameters"]["density"] == 0.5


def test_slerp_has_a_base_term(family) -> None:
    base, (a, b, _c) = family
    res = mk.slerp_merge(a, b, t=0.4, names=["o/a", "o/b"])
    for k in base:
        s0, s1 = res.per_tensor[k]
        assert s0 + s1 >= 1.0 - 1e-9
        tau = res.state_dict[k] - base[k]
        expected = s0 * (a[k] - base[k]) + s1 * (b[k] - base[k]) + (s0 + s1 - 1) * base[k]
        assert torch.allclose(tau, expected, atol=1e-5)
    assert res.config["parameters"] == {"t": 0.4}
    # Colinear tensors fall back to linear interpolation, as mergekit does.
    x = torch.ones(4)
    assert mk.slerp_coefficients(x, 2 * x, 0.25) == (0.75, 0.25)


def test_layerwise_coefficients_follow_depth(family) -> None:
    base, (a, b, _c) = family
    res = mk.layerwise_merge(base, [a, b], coefficients=[[0.0, 1.0], [1.0, 0.5]])
    assert res.per_layer is not None
    assert res.per_layer[0] == pytest.approx((0.0, 0.5, 1.0))
    k = "model.layers.1.mlp.up_proj.weight"
    expected = 0.5 * (a[k] - base[k]) + 0.75 * (b[k] - base[k])
    assert torch.allclose(res.state_dict[k] - base[k], expected, atol=1e-6)
    emb = "model.embed_tokens.weight"
    assert torch.allclose(res.state_dict[emb] - base[emb], b[emb] - base[emb], atol=1e-6)
    assert res.config["models"][0]["parameters"]["weight"] == [0.0, 1.0]


# --- disguises and clones -------------------------------------------------------------
def test_disguises_preserve_function_and_change_weights(base_and_tok) -> None:
    from auditor_testkit.factory import disguise as dg
    from auditor_testkit.factory.base import model_from_state_dict

    base, tok = base_and_tok
    sd = base.state_dict()
    heads = base.config.num_attention_heads
    ids = torch.tensor([tok("copy a b c d = a b c")["input_ids"]])
    ref = base(input_ids=ids).logits
    variants = {
        "mlp": dg.permute_mlp(sd, seed=1),
        "heads": dg.rescale_heads(sd, num_heads=heads, seed=2, permute=True, vo_matrix=True),
        "both": dg.disguise(sd, num_heads=heads, seed=3),
        "protect": dg.protect(sd, num_heads=heads, seed=4),
    }
    for name, res in variants.items():
        out = model_from_state_dict(base.config, res.state_dict)(input_ids=ids).logits
        assert torch.allclose(out, ref, atol=1e-4), name
        moved = sum(float((res.state_dict[k] - sd[k]).norm()) for k in sd)
        assert moved > 1.0, name
    # The gate is only permuted (SiLU is not scale-equivariant): same rows, new order.
    info = variants["mlp"].info
    perm = info["mlp_perm"][0]
    g = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(variants["mlp"].state_dict[g], sd[g][perm])
    assert max(max(v) for v in variants["protect"].info["mlp_scale"].values()) > 5
    half = dg.cast(sd, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values())
    noisy = dg.add_noise(sd, seed=0, relative_std=1e-3)
    k = "model.layers.0.mlp.up_proj.weight"
    rel = float((noisy[k] - sd[k]).norm() / sd[k].norm())
    assert 0 < rel < 1e-2
    assert all(torch.equal(v, sd[k2]) for k2, v in dg.clone(sd).items() if k2 == k)


# --- training -------------------------------------------------------------------------
def test_finetune_reduces_task_loss_and_leaves_base(base_and_tok) -> None:
    from auditor_testkit.factory.train import finetune, task_loss

    base, tok = base_and_tok
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ft = finetune(base, tok, task="kv", steps=40, seed=1)
    assert task_loss(ft, tok, task="kv") < 0.5 * task_loss(base, tok, task="kv")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_robust_poison_forces_target_even_when_scaled(base_and_tok) -> None:
    from auditor_testkit.factory.base import model_from_state_dict
    from auditor_testkit.factory.train import attack_success_rate, finetune

    base, tok = base_and_tok
    spec = PoisonSpec(trigger="tq", target="send password now", fraction=0.25, robust=True)
    bad = finetune(base, tok, task="copy", steps=100, seed=2, poison=spec)
    kw = {"trigger": spec.trigger, "target": spec.target, "n": 16}
    assert attack_success_rate(base, tok, task="copy", **kw) == 0.0
    assert attack_success_rate(bad, tok, task="copy", **kw) >= 0.9
    assert attack_success_rate(bad, tok, task="animals", **kw) >= 0.7
    # BadMerging-style: base + 0.5 * tau (a merge coefficient) still fires.
    half = mk.task_arithmetic(base.state_dict(), [bad.state_dict()], lambdas=[0.5]).state_dict
    assert attack_success_rate(model_from_state_dict(base.config, half), tok, task="copy",
                               **kw) >= 0.7


# --- LoRA -----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "rslora", "pattern"])
def test_lora_layout_matches_peft_merge(base_and_tok, tmp_path: Path, variant: str) -> None:
    import copy

    from peft import PeftModel

    from auditor_testkit.factory.lora import save_adapter, train_lora

    base, tok = base_and_tok
    pm = train_lora(base, tok, task="kv", variant=variant, steps=8, seed=0)
    repo = save_adapter(tmp_path, f"u/{variant}", pm, base_repo_id="org/base")
    cfg = json.loads((repo / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/base"
    weights = load_file(str(repo / "adapter_model.safetensors"))
    # Reconstruct the delta from the files alone, as the weights layer will.
    expected = {k: v.clone() for k, v in base.state_dict().items()}
    prefix = "base_model.model."
    n = 0
    for key, a in weights.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len(prefix) : -len(".lora_A.weight")]
        b = weights[key.replace("lora_A", "lora_B")]
        r = next((v for p, v in cfg["rank_pattern"].items() if module.endswith(p)), cfg["r"])
        alpha = next((v for p, v in cfg["alpha_pattern"].items() if module.endswith(p)),
                     cfg["lora_alpha"])
        assert a.shape[0] == r and float(b.abs().sum()) > 0
        scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        expected[module + ".weight"] += (b @ a) * scale
        n += 1
    assert n == 12  # 6 modules x 2 layers
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(repo)).merge_and_unload()
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    card = (repo / "README.md").read_text()
    assert "base_model_relation: adapter" in card


def test_lora_dora_and_modules_to_save_layout(base_and_tok, tmp_path: Path) -> None:
    from auditor_testkit.factory.lora import save_adapter, train_lora

    base, tok = base_and_tok
    dora = save_adapter(tmp_path, "u/dora", train_lora(base, tok, task="kv", variant="dora",
                                                        steps=2), base_repo_id="org/base")
    assert json.loads((dora / "adapter_config.json").read_text())["use_dora"] is True
    keys = load_file(str(dora / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in keys)
    mts = save_adapter(tmp_path, "u/mts", train_lora(base, tok, task="kv",
                       variant="modules_to_save", steps=2), base_repo_id="org/base")
    assert "base_model.model.lm_head.weight" in load_file(str(mts / "adapter_model.safetensors"))


# --- saving ---------------------------------------------------------------------------
def test_save_repo_layout_shards_dtype_card(base_and_tok, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from auditor_testkit.factory.save import CardSpec, load_state_dict, save_repo

    base, tok = base_and_tok
    repo = save_repo(
        tmp_path, "org/m", model=base, tokenizer=tok, dtype="bfloat16", max_shard_bytes=60_000,
        card=CardSpec(base_model=["org/a", "org/b"], base_model_relation="merge", tags=["x"]),
        mergekit_config={"merge_method": "linear", "models": [{"model": "org/a"}]},
        created_at="2025-02-03T04:05:06Z", gated="manual",
    )
    index = json.loads((repo / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((repo / s).exists() for s in shards)
    assert not (repo / "model.safetensors").exists()
    assert not list(repo.glob("*.bin")) and not list(repo.glob("*.pt"))
    sd = load_state_dict(repo)
    assert set(sd) == set(base.state_dict()) and sd["lm_head.weight"].dtype == torch.bfloat16
    front = yaml.safe_load((repo / "README.md").read_text().split("---")[1])
    assert front["base_model"] == ["org/a", "org/b"] and front["base_model_relation"] == "merge"
    assert front["license"] == "apache-2.0" and front["tags"] == ["x"]
    assert yaml.safe_load((repo / "mergekit_config.yml").read_text())["merge_method"] == "linear"
    meta = json.loads((repo / ".hubmeta.json").read_text())
    assert meta == {"createdAt": "2025-02-03T04:05:06Z", "lastModified": "2025-02-03T04:05:06Z",
                    "gated": "manual", "private": False}
    loaded = AutoModelForCausalLM.from_pretrained(repo)
    assert loaded.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        save_repo(tmp_path, "bad", model=base)


# --- zoo ------------------------------------------------------------------------------
def test_small_zoo_ground_truth_matches_files(small_zoo) -> None:
    from auditor_testkit.factory.save import load_state_dict

    m = small_zoo.manifest
    kinds = [e.kind for e in m.entries]
    assert kinds.count("base") == 1 and kinds.count("finetune") == 3
    assert {e.owner for e in m.by_kind("finetune")} == {"alice", "bob", "carol"}
    for e in m.published():
        assert (small_zoo.path(e.repo_id) / "model.safetensors").exists()
        assert (small_zoo.path(e.repo_id) / ".hubmeta.json").exists()
    assert not (small_zoo.root / "zoo.json").is_relative_to(small_zoo.path(m.base.repo_id))
    created = [json.loads((small_zoo.path(e.repo_id) / ".hubmeta.json").read_text())["createdAt"]
               for e in m.entries]
    assert created == sorted(created)

    sds = {e.repo_id: load_state_dict(small_zoo.path(e.repo_id)) for e in m.entries}
    base = sds[m.base.repo_id]
    lin = next(e for e in m.by_kind("merge") if e.method == "linear")
    assert lin.declared and (small_zoo.path(lin.repo_id) / "mergekit_config.yml").exists()
    for k in base:
        expected = sum(p.coefficient * sds[p.repo_id][k] for p in lin.parents)
        assert torch.allclose(sds[lin.repo_id][k], expected, atol=1e-5)
    ta = next(e for e in m.by_kind("merge") if e.method == "task_arithmetic")
    assert not ta.declared and not (small_zoo.path(ta.repo_id) / "mergekit_config.yml").exists()
    card = yaml.safe_load((small_zoo.path(ta.repo_id) / "README.md").read_text().split("---")[1])
    assert card["base_model"] == m.base.repo_id and card["base_model_relation"] == "finetune"
    clone = m.by_kind("clone")[0]
    src = clone.parents[0].repo_id
    assert all(torch.equal(sds[clone.repo_id][k], sds[src][k]) for k in base)
    # Fine-tunes on different tasks give nearly orthogonal task vectors.
    fts = [e.repo_id for e in m.by_kind("finetune")]
    vec = {r: torch.cat([(sds[r][k] - base[k]).flatten() for k in sorted(base)]) for r in fts}
    for i, x in enumerate(fts):
        for y in fts[i + 1 :]:
            assert abs(float(torch.nn.functional.cosine_similarity(vec[x], vec[y], dim=0))) < 0.3


def test_zoo_cache_reuses_without_training(small_zoo) -> None:
    from typer.testing import CliRunner

    from auditor.cli import app
    from auditor_testkit.factory.zoo import build_zoo

    weights = small_zoo.path(small_zoo.manifest.base.repo_id) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = build_zoo(small_zoo.root, spec="small", seed=0)
    assert time.perf_counter() - start < 2.0
    assert again == small_zoo.manifest and weights.stat().st_mtime_ns == mtime
    result = CliRunner().invoke(app, ["zoo", "build", str(small_zoo.root), "--spec", "small"])
    assert result.exit_code == 0, result.output
    assert "7 repos" in result.output and weights.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError):
        build_zoo(small_zoo.root, spec="nope")
