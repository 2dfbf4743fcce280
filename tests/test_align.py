"""Alignment undoes permutation and rescaling disguises; a no-op on honest fine-tunes."""

from __future__ import annotations

import torch

from auditor.analysis.align import align_to_base
from auditor.analysis.similarity import cosine_report
from auditor.weights.dict_sources import DictTensorSource
from tests.lineage_synth import add, base_weights, fp, task_vector

HEADS, HD = 4, 8


def disguise(w: dict[str, torch.Tensor], seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = dict(w)
    for i in range(3):
        p = f"model.layers.{i}.mlp."
        perm = torch.randperm(64, generator=g)
        s = torch.rand(64, generator=g) * 3 + 0.3
        w[p + "gate_proj.weight"] = w[p + "gate_proj.weight"][perm]
        w[p + "up_proj.weight"] = w[p + "up_proj.weight"][perm] * s[:, None]
        w[p + "down_proj.weight"] = w[p + "down_proj.weight"][:, perm] / s[None, :]
        a = f"model.layers.{i}.self_attn."
        sa = (torch.rand(HEADS, generator=g) * 3 + 0.3).repeat_interleave(HD)
        sb = (torch.rand(HEADS, generator=g) * 3 + 0.3).repeat_interleave(HD)
        w[a + "q_proj.weight"] = w[a + "q_proj.weight"] * sa[:, None]
        w[a + "k_proj.weight"] = w[a + "k_proj.weight"] / sa[:, None]
        w[a + "v_proj.weight"] = w[a + "v_proj.weight"] * sb[:, None]
        w[a + "o_proj.weight"] = w[a + "o_proj.weight"] / sb[None, :]
    return w


def test_disguise_undone() -> None:
    base, tau = base_weights(), task_vector(1)
    ft = add(base, tau)
    res = align_to_base(DictTensorSource(disguise(ft)), DictTensorSource(base), num_heads=HEADS)
    assert res.report.permuted and res.report.rescaled and res.report.applied
    assert res.report.distance_from_identity > 0.9
    aligned = {n: res.source.get(n) - base[n] for n in base}
    raw = {n: disguise(ft)[n] - base[n] for n in base}
    assert cosine_report(fp(aligned), fp(tau)).cosine > 0.99
    assert cosine_report(fp(raw), fp(tau)).cosine < 0.5


def test_noop_on_honest_finetune() -> None:
    base = base_weights()
    ft = add(base, task_vector(2))
    res = align_to_base(
        DictTensorSource(ft),
        DictTensorSource(base),
        config={"num_attention_heads": HEADS, "num_key_value_heads": HEADS},
    )
    assert not res.report.applied and not res.report.permuted
    assert res.report.layers_changed == []
    assert all(torch.equal(res.source.get(n), ft[n]) for n in ft)


def test_other_architecture_skipped() -> None:
    w = {"transformer.h.0.attn.c_attn.weight": torch.randn(8, 8)}
    res = align_to_base(DictTensorSource(w), DictTensorSource(w))
    assert not res.report.applied and res.report.skipped


def test_factory_disguises_with_head_permutation() -> None:
    from auditor_testkit.factory import disguise as dg

    base, tau = base_weights(), task_vector(4)
    ft = add(base, tau)
    d = dg.permute_mlp(ft, seed=5).state_dict
    d = dg.rescale_heads(d, num_heads=HEADS, seed=6, permute=True).state_dict
    res = align_to_base(DictTensorSource(d), DictTensorSource(base), num_heads=HEADS)
    assert res.report.permuted
    aligned = {n: res.source.get(n) - base[n] for n in base}
    assert cosine_report(fp(aligned), fp(tau)).cosine > 0.99
