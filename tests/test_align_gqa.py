"""Alignment at real-model structure: grouped-query attention, q/k/v biases, invertible
per-head Q/K and V/O maps; and the linear disguise screen in front of it."""

from __future__ import annotations

import math

import torch

from auditor.analysis.align import _match_neurons, _solve_map, align_to_base
from auditor.analysis.disguise_screen import ScreenTap, screen_sources
from auditor.weights.dict_sources import DictTensorSource

HIDDEN, HEADS, KV, HD, INTER, LAYERS = 48, 6, 2, 8, 96, 2
CONFIG = {"num_attention_heads": HEADS, "num_key_value_heads": KV,
          "intermediate_size": INTER}


def _base(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (64, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HEADS * HD, HIDDEN),
            p + "self_attn.q_proj.bias": (HEADS * HD,),
            p + "self_attn.k_proj.weight": (KV * HD, HIDDEN),
            p + "self_attn.k_proj.bias": (KV * HD,),
            p + "self_attn.v_proj.weight": (KV * HD, HIDDEN),
            p + "self_attn.v_proj.bias": (KV * HD,),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HD),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        }
    return {n: torch.randn(s, generator=g) * 0.3 for n, s in shapes.items()}


def _finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in base.items()}


def _rope_commuting(gen: torch.Generator) -> torch.Tensor:
    """A scaled rotation per RoPE frequency pair (i, i + HD/2): commutes with RoPE."""
    m = torch.zeros(HD, HD, dtype=torch.float64)
    half = HD // 2
    for i in range(half):
        ang = float(torch.rand(1, generator=gen)) * 2 * math.pi
        r = math.exp(float(torch.rand(1, generator=gen)) * 2 - 1)
        c, s = r * math.cos(ang), r * math.sin(ang)
        m[i, i], m[i, i + half], m[i + half, i], m[i + half, i + half] = c, -s, s, c
    return m


def _disguise(w: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Permuted, rescaled MLP; per kv group a RoPE-commuting Q/K map and a general V/O map."""
    gen = torch.Generator().manual_seed(seed)
    out = {n: t.clone().double() for n, t in w.items()}
    group = HEADS // KV
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp."
        perm = torch.randperm(INTER, generator=gen)
        c = torch.exp(torch.rand(INTER, generator=gen, dtype=torch.float64) * 3 - 1.5)
        out[p + "gate_proj.weight"] = out[p + "gate_proj.weight"][perm]
        out[p + "up_proj.weight"] = out[p + "up_proj.weight"][perm] * c[:, None]
        out[p + "down_proj.weight"] = out[p + "down_proj.weight"][:, perm] / c[None, :]
        a = f"model.layers.{i}.self_attn."
        for g in range(KV):
            kv = slice(g * HD, (g + 1) * HD)
            qk = _rope_commuting(gen)
            vo = torch.linalg.qr(torch.randn(HD, HD, generator=gen, dtype=torch.float64))[0]
            vo = vo @ torch.diag(torch.exp(torch.rand(HD, generator=gen,
                                                      dtype=torch.float64) - 0.5))
            inv_t = torch.linalg.inv(qk).T
            for h in range(g * group, (g + 1) * group):
                qs = slice(h * HD, (h + 1) * HD)
                out[a + "q_proj.weight"][qs] = qk @ out[a + "q_proj.weight"][qs]
                out[a + "q_proj.bias"][qs] = qk @ out[a + "q_proj.bias"][qs]
                out[a + "o_proj.weight"][:, qs] = out[a + "o_proj.weight"][:, qs] @ \
                    torch.linalg.inv(vo)
            out[a + "k_proj.weight"][kv] = inv_t @ out[a + "k_proj.weight"][kv]
            out[a + "k_proj.bias"][kv] = inv_t @ out[a + "k_proj.bias"][kv]
            out[a + "v_proj.weight"][kv] = vo @ out[a + "v_proj.weight"][kv]
            out[a + "v_proj.bias"][kv] = vo @ out[a + "v_proj.bias"][kv]
    return {n: t.float() for n, t in out.items()}


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[n] - b[n]).pow(2).sum()) for n in a)
    return math.sqrt(num / sum(float(b[n].pow(2).sum()) for n in b))


def test_gqa_biases_and_invertible_maps_undone() -> None:
    base = _base()
    ft = _finetune(base, 1)
    disguised = _disguise(ft, seed=7)
    assert _rel(disguised, ft) > 0.5
    res = align_to_base(DictTensorSource(disguised), DictTensorSource(base), config=CONFIG)
    assert res.report.permuted and res.report.rescaled
    aligned = {n: res.source.get(n) for n in ft}
    tau = {n: ft[n] - base[n] for n in ft}
    got = {n: aligned[n] - base[n] for n in ft}
    # the fine-tune's own change is recovered (the split of a change between A and A^-T
    # is not identifiable, so only nearly, not exactly)
    assert _rel(got, tau) < 0.35
    assert _rel(aligned, ft) < 0.02


def test_honest_gqa_finetune_untouched() -> None:
    base = _base()
    ft = _finetune(base, 2)
    res = align_to_base(DictTensorSource(ft), DictTensorSource(base), config=CONFIG)
    assert not res.report.applied and not res.report.permuted


def test_contested_matches_settled_by_assignment() -> None:
    gen = torch.Generator().manual_seed(3)
    n, d = 40, 16
    g_b = torch.randn(n, d, generator=gen)
    # two base neurons nearly equal: both subject copies prefer the same one greedily
    g_b[1] = g_b[0] + 0.01 * torch.randn(d, generator=gen)
    u_b, d_b = torch.randn(n, d, generator=gen), torch.randn(d, n, generator=gen)
    perm = torch.randperm(n, generator=gen)
    perm_found, score = _match_neurons(g_b[perm], g_b, u_b[perm], u_b, d_b[:, perm], d_b)
    assert sorted(perm_found.tolist()) == list(range(n))  # a permutation, no duplicates
    inv = torch.empty(n, dtype=torch.long)
    inv[perm] = torch.arange(n)
    assert torch.equal(perm_found, inv)
    assert float(score.min()) > 0.9


def test_solve_map_recovers_matrix_without_kronecker() -> None:
    gen = torch.Generator().manual_seed(5)
    hd, m = 16, 300
    f_b, g_b = torch.randn(hd, m, generator=gen), torch.randn(hd, 2 * m, generator=gen)
    mix = torch.randn(hd, hd, generator=gen, dtype=torch.float64) + 3 * torch.eye(hd)
    f_s = (torch.linalg.inv(mix) @ f_b.double()).float()
    g_s = (mix.T @ g_b.double()).float()
    a = _solve_map(f_s, f_b, g_s, g_b)
    assert torch.allclose(a, mix, atol=1e-3)


def test_screen_flags_disguise_and_passes_finetunes() -> None:
    base = _base()
    honest = _finetune(base, 3, scale=0.05)
    assert not screen_sources(DictTensorSource(honest), DictTensorSource(base),
                              config=CONFIG).suspect
    screen = screen_sources(DictTensorSource(_disguise(honest, seed=9)),
                            DictTensorSource(base), config=CONFIG)
    assert screen.suspect and screen.moved_share > 0.5


def test_screen_tap_sees_pairs_read_by_the_task_vector_pass() -> None:
    from auditor.weights.task_vectors import model_deltas

    base = _base()
    tap = ScreenTap(DictTensorSource(_disguise(_finetune(base, 4), seed=11)),
                    DictTensorSource(base), config=CONFIG)
    deltas, _ = model_deltas(tap.subject, tap.base)
    for name in deltas.keys():
        deltas.delta(name)
    assert tap.screen.suspect
    assert set(tap.screen.layers) == {f"layer.{i}.{k}" for i in range(LAYERS)
                                      for k in ("mlp", "attn")}
