"""The fused task-vector pass (``auditor.analysis.delta_print``) against the old one.

Every test computes both: ``ScreenTap`` + ``model_deltas`` + ``compute_fingerprint`` (the
reference) and ``model_deltas`` + ``fused_fingerprint``, on the same files, and asks for
bit-identical samples, identical zero fractions and screen counts, and squared norms
within 1e-6 relative.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from auditor.analysis import delta_kernel, delta_print, delta_reader
from auditor.analysis.delta_print import (
    fused_fingerprint,
    fused_supported,
    fused_weights_fingerprint,
)
from auditor.analysis.disguise_screen import DisguiseScreen, ScreenTap, new_screen
from auditor.analysis.fingerprint import (
    Fingerprint,
    compute_fingerprint,
    fingerprint_weights,
    nonfinite_tensors,
)
from auditor.errors import NonFiniteWeights
from auditor.weights.dict_sources import DictTensorSource
from auditor.weights.reader import open_model
from auditor.weights.resident import CachingSource, ResidentSource
from auditor.weights.task_vectors import model_deltas

HIDDEN, HEADS, KV, HD, INTER, LAYERS, VOCAB = 48, 6, 2, 8, 96, 2, 64
CONFIG = {"num_attention_heads": HEADS, "num_key_value_heads": KV,
          "intermediate_size": INTER, "tie_word_embeddings": False}
Sd = dict[str, torch.Tensor]


@pytest.fixture(autouse=True, params=["torch", "kernel"])
def _pass_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both paths: torch blocks (small models) and the compiled kernel
    (``delta_kernel``, forced on here however small the model)."""
    if request.param == "kernel":
        if delta_kernel.load() is None:
            pytest.fail("the compiled delta kernel did not load")
        monkeypatch.setattr(delta_print, "KERNEL_MIN_ELEMENTS", 0)
    else:
        monkeypatch.setattr(delta_print, "KERNEL_MIN_ELEMENTS", 1 << 62)
    return str(request.param)


def _base(seed: int = 0) -> Sd:
    """A grouped-query Llama-shaped state dict (KV < HEADS), untied head."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "lm_head.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HEADS * HD, HIDDEN),
            p + "self_attn.k_proj.weight": (KV * HD, HIDDEN),
            p + "self_attn.v_proj.weight": (KV * HD, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HD),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
        }
    return {n: torch.randn(s, generator=g) * 0.3 for n, s in shapes.items()}


def _finetune(base: Sd, seed: int, scale: float = 0.02) -> Sd:
    g = torch.Generator().manual_seed(100 + seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in base.items()}


def _disguise(w: Sd, seed: int) -> Sd:
    """MLP neurons permuted (up rows scaled by c, down columns by 1/c), q/k heads of each
    kv group rescaled (q by a, k by 1/a), v/o heads by b and 1/b: the screen's moved and
    rescaled counts are both far from zero."""
    gen = torch.Generator().manual_seed(seed)
    out = {n: t.clone().double() for n, t in w.items()}
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp."
        perm = torch.randperm(INTER, generator=gen)
        c = torch.exp(torch.rand(INTER, generator=gen, dtype=torch.float64) * 3 - 1.5)
        out[p + "gate_proj.weight"] = out[p + "gate_proj.weight"][perm]
        out[p + "up_proj.weight"] = out[p + "up_proj.weight"][perm] * c[:, None]
        out[p + "down_proj.weight"] = out[p + "down_proj.weight"][:, perm] / c[None, :]
        a = f"model.layers.{i}.self_attn."
        for g in range(KV):
            s = math.exp(float(torch.rand(1, generator=gen)) * 3 - 1.5)
            kv = slice(g * HD, (g + 1) * HD)
            out[a + "k_proj.weight"][kv] /= s
            out[a + "v_proj.weight"][kv] *= 1 / s
            for h in range(g * HEADS // KV, (g + 1) * HEADS // KV):
                qs = slice(h * HD, (h + 1) * HD)
                out[a + "q_proj.weight"][qs] *= s
                out[a + "o_proj.weight"][:, qs] *= s
    return {n: t.float() for n, t in out.items()}


def _save(sd: Sd, folder: Path, dtype: torch.dtype, *, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    import json

    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _old(subject: Any, base: Any, *, config: dict | None = CONFIG,
         base_config: dict | None = CONFIG) -> tuple[Fingerprint, DisguiseScreen]:
    tap = ScreenTap(subject, base, config=config)
    deltas, _ = model_deltas(tap.subject, tap.base, model_config=config, base_config=base_config)
    return compute_fingerprint(deltas), tap.screen


def _new(subject: Any, base: Any, *, config: dict | None = CONFIG,
         base_config: dict | None = CONFIG, **kw: Any) -> tuple[Fingerprint, DisguiseScreen]:
    assert fused_supported(subject, base)
    screen = new_screen(config)
    deltas, _ = model_deltas(subject, base, model_config=config, base_config=base_config)
    return fused_fingerprint(deltas, screen=screen, **kw), screen


def _assert_same(old: tuple[Fingerprint, DisguiseScreen],
                 new: tuple[Fingerprint, DisguiseScreen]) -> None:
    (fo, so), (fn, sn) = old, new
    assert fn.keys() == fo.keys()
    assert dict(fn.meta) == dict(fo.meta)
    for name in fo.keys():
        a, b = fo.tensors[name], fn.tensors[name]
        assert (b.shape, b.numel, b.group) == (a.shape, a.numel, a.group), name
        assert b.zero_fraction == a.zero_fraction, name
        assert b.sq_norm == pytest.approx(a.sq_norm, rel=1e-6, abs=0.0), name
        assert b.sample.dtype == np.float32
        # bit for bit (the same float32 subtraction at the same coordinates)
        assert a.sample.tobytes() == b.sample.tobytes(), name
    assert sn.layers == so.layers
    assert sn.summary() == so.summary()
    assert (sn.num_heads, sn.num_kv_heads) == (so.num_heads, so.num_kv_heads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_honest_finetune_with_resized_vocab_zero_and_nan_tensors(
        tmp_path: Path, dtype: torch.dtype) -> None:
    base = _base()
    sub = _finetune(base, 1)
    # vocabulary grown by 6 rows (only the shared 64 are compared)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sub[name] = torch.cat([sub[name], torch.randn(6, HIDDEN)])
    sub["model.layers.1.mlp.up_proj.weight"] = base["model.layers.1.mlp.up_proj.weight"]
    sub["model.layers.0.self_attn.k_proj.weight"][3, 5] = float("nan")
    # gate rows with flipped sign: moved (gate units are signed), up/down untouched
    sub["model.layers.0.mlp.gate_proj.weight"][::3] *= -1
    bdir, sdir = _save(base, tmp_path / "b", dtype), _save(sub, tmp_path / "s", dtype, shards=3)
    old = _old(open_model(sdir), CachingSource(open_model(bdir)))
    new = _new(open_model(sdir), CachingSource(open_model(bdir)))
    _assert_same(old, new)
    fp = new[0]
    assert nonfinite_tensors(fp) == ["model.layers.0.self_attn.k_proj.weight"]
    assert fp.tensors["model.layers.1.mlp.up_proj.weight"].sq_norm == 0.0
    assert fp.tensors["model.layers.1.mlp.up_proj.weight"].zero_fraction == 1.0
    assert fp.tensors["model.embed_tokens.weight"].shape == (VOCAB, HIDDEN)
    screen = new[1]
    assert not screen.suspect  # screened: only a few gate rows moved
    assert screen.layers["layer.0.mlp"].moved == INTER // 3
    assert screen.layers["layer.1.mlp"].moved == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_disguised_model_same_screen_counts(tmp_path: Path, dtype: torch.dtype) -> None:
    base = _base()
    sub = _disguise(_finetune(base, 2), seed=5)
    bdir, sdir = _save(base, tmp_path / "b", dtype), _save(sub, tmp_path / "s", dtype)
    old = _old(open_model(sdir), open_model(bdir))
    # small blocks: column units (down, o) add partial sums from many blocks
    new = _new(open_model(sdir), open_model(bdir), block_elements=3 * HIDDEN)
    _assert_same(old, new)
    screen = new[1]
    assert screen.suspect
    assert set(screen.layers) == {f"layer.{i}.{k}" for i in range(LAYERS) for k in ("mlp", "attn")}
    mlp, attn = screen.layers["layer.0.mlp"], screen.layers["layer.0.attn"]
    assert mlp.units == 3 * INTER and mlp.moved > INTER
    assert attn.units == 2 * HEADS + 2 * KV and attn.rescaled > 0


@pytest.mark.parametrize("workers", [1, 3])
def test_many_chunks_merged_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     workers: int) -> None:
    """Reads of a few rows each, blocks of a few rows, several compute threads: column
    sums (down, o) gather partial sums from many chunks finished in any order."""
    monkeypatch.setattr(delta_reader, "READ_CHUNK_BYTES", 5 * HIDDEN * 2)
    monkeypatch.setattr(delta_reader, "POOLED_CHUNK_BYTES", 5 * HIDDEN * 2)
    made: list[int] = []
    take = delta_reader._Pool.take

    def counted(self: delta_reader._Pool, stop: threading.Event) -> torch.Tensor | None:
        buf = take(self, stop)
        made.append(id(buf))
        assert self._made <= self._limit
        return buf

    monkeypatch.setattr(delta_reader._Pool, "take", counted)
    base = _base(1)
    sub = _disguise(_finetune(base, 3), seed=4)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sub[name] = sub[name][:VOCAB - 7]  # vocabulary shrunk: 57 shared rows
    bdir, sdir = _save(base, tmp_path / "b", torch.bfloat16), _save(sub, tmp_path / "s",
                                                                      torch.bfloat16)
    old = _old(open_model(sdir), open_model(bdir))
    new = _new(open_model(sdir), CachingSource(open_model(bdir)), workers=workers,
               block_elements=2 * HIDDEN)
    _assert_same(old, new)
    assert new[1].suspect
    assert new[0].tensors["model.embed_tokens.weight"].shape == (VOCAB - 7, HIDDEN)
    # the subject's chunks were read into a few buffers, each reused many times (a buffer
    # handed back before its chunk was done would have changed the figures above)
    limit = delta_reader.PREFETCH_CHUNKS + 2 * workers + 3
    assert len(made) > 2 * limit and len(set(made)) <= limit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weights_print_matches_fingerprint_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    monkeypatch.setattr(delta_reader, "READ_CHUNK_BYTES", 7 * HIDDEN)
    sd = _base(2)
    sd["model.layers.1.mlp.up_proj.weight"][::2] = 0.0  # exact zeros
    sd["model.layers.0.mlp.down_proj.weight"][1, 1] = float("inf")
    bdir = _save(sd, tmp_path / "b", dtype, shards=2)
    old = fingerprint_weights(open_model(bdir))
    cached = CachingSource(open_model(bdir))
    new = fused_weights_fingerprint(cached, block_elements=3 * HIDDEN)
    _assert_same((old, DisguiseScreen()), (new, DisguiseScreen()))
    assert new.meta["kind"] == "weights"
    assert nonfinite_tensors(new) == ["model.layers.0.mlp.down_proj.weight"]
    assert new.tensors["model.layers.1.mlp.up_proj.weight"].zero_fraction == 0.5
    # held by the cache for the next reader, unchanged
    assert torch.equal(cached.get("model.norm.weight"),
                       sd["model.norm.weight"].to(dtype).float())


def test_sources_held_in_memory_and_whole_block_sizes(tmp_path: Path) -> None:
    base = _base(3)
    sub = _disguise(_finetune(base, 4), seed=8)
    dict_base, dict_sub = DictTensorSource(base), DictTensorSource(sub)
    old = _old(dict_sub, dict_base)
    for block in (1, 1000, 1 << 19):
        new = _new(ResidentSource(dict_sub, dtype=torch.bfloat16), ResidentSource(dict_base),
                   block_elements=block)
        ref = _old(ResidentSource(dict_sub, dtype=torch.bfloat16), ResidentSource(dict_base))
        _assert_same(ref, new)
    assert old[1].summary() == new[1].summary()


def test_renamed_model_and_tied_base_head(tmp_path: Path) -> None:
    """Aliases: the subject's names carry another prefix, and the base ties its head to
    the embeddings (no lm_head in its file) while the subject ships one."""
    base = _base(5)
    sub = _finetune(base, 6)
    del base["lm_head.weight"]
    renamed = {k.replace("model.", "transformer.", 1): v for k, v in sub.items()}
    bdir = _save(base, tmp_path / "b", torch.bfloat16)
    sdir = _save(renamed, tmp_path / "s", torch.bfloat16)
    base_cfg = {**CONFIG, "tie_word_embeddings": True}
    old = _old(open_model(sdir), open_model(bdir), base_config=base_cfg)
    new = _new(open_model(sdir), open_model(bdir), base_config=base_cfg)
    _assert_same(old, new)
    assert "lm_head.weight" in new[0].tensors
    assert new[1].layers


def test_scalar_empty_and_one_dimensional_tensors() -> None:
    base = {"model.layers.0.mlp.gate_proj.weight": torch.randn(8, 4),
            "model.scale": torch.tensor(2.0), "model.empty": torch.zeros(0, 4),
            "model.norm.weight": torch.randn(5000)}
    sub = {k: v + 0.25 for k, v in base.items()}
    old = _old(DictTensorSource(sub), DictTensorSource(base), config=None, base_config=None)
    new = _new(ResidentSource(DictTensorSource(sub)), ResidentSource(DictTensorSource(base)),
               config=None, base_config=None, block_elements=7)
    _assert_same(old, new)


def test_extreme_magnitudes_match_float64() -> None:
    """Squares that overflow or underflow float32 are summed in float64, as before."""
    base = {"model.a.weight": torch.zeros(4, 4), "model.b.weight": torch.zeros(4, 4)}
    sub = {"model.a.weight": torch.full((4, 4), 3e20), "model.b.weight": torch.full((4, 4), 1e-30)}
    old = _old(DictTensorSource(sub), DictTensorSource(base), config=None, base_config=None)
    new = _new(ResidentSource(DictTensorSource(sub)), ResidentSource(DictTensorSource(base)),
               config=None, base_config=None)
    _assert_same(old, new)
    assert math.isfinite(new[0].tensors["model.a.weight"].sq_norm)
    assert new[0].tensors["model.b.weight"].sq_norm > 0


def test_all_nan_raises_like_the_old_path(tmp_path: Path) -> None:
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 4)}
    sub = {"model.layers.0.mlp.up_proj.weight": torch.full((8, 4), float("nan"))}
    with pytest.raises(NonFiniteWeights):
        _old(DictTensorSource(sub), DictTensorSource(base))
    with pytest.raises(NonFiniteWeights) as info:
        _new(ResidentSource(DictTensorSource(sub)), ResidentSource(DictTensorSource(base)))
    assert info.value.tensors == ["model.layers.0.mlp.up_proj.weight"]


def test_reader_errors_reach_the_caller_and_threads_restored(tmp_path: Path) -> None:
    base = _base()
    bdir = _save(base, tmp_path / "b", torch.bfloat16)
    sdir = _save(_finetune(base, 1), tmp_path / "s", torch.bfloat16)
    before = torch.get_num_threads()

    class Broken(ResidentSource):
        def get_stored_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
            if "layers.1" in name:
                raise OSError("disk gone")
            return super().get_stored_rows(name, start, stop)

    deltas, _ = model_deltas(Broken(open_model(sdir)), open_model(bdir))
    with pytest.raises(OSError, match="disk gone"):
        fused_fingerprint(deltas, screen=new_screen(CONFIG))
    assert torch.get_num_threads() == before


def test_fused_supported_only_for_stored_reads() -> None:
    src = DictTensorSource({"a": torch.zeros(2)})
    assert not fused_supported(src, ResidentSource(src))
    assert fused_supported(ResidentSource(src), CachingSource(ResidentSource(src)))
    tap = ScreenTap(ResidentSource(src), ResidentSource(src))
    assert not fused_supported(tap.subject, tap.base)


def _open_model(folder: Path, config: dict) -> Any:
    files = {p.name: p for p in folder.iterdir()}
    return SimpleNamespace(files=files, config=config,
                           inventory=SimpleNamespace(has_adapter=False, safetensors=True))


@pytest.mark.parametrize("disguised", [False, True])
def test_weights_detector_uses_fused_path_with_same_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disguised: bool) -> None:
    from auditor.detectors import weights

    base = _base()
    sub = _finetune(base, 7)
    if disguised:
        sub = _disguise(sub, seed=9)
    bdir, sdir = _save(base, tmp_path / "b", torch.bfloat16), _save(sub, tmp_path / "s",
                                                                      torch.bfloat16)
    calls: list[int] = []
    real = delta_print.fused_fingerprint

    def counting(*a: Any, **kw: Any) -> Fingerprint:
        calls.append(1)
        return real(*a, **kw)

    def run() -> Any:
        ctx = SimpleNamespace(open_sources=[], file_issues=[],
                              base=SimpleNamespace(config=CONFIG))
        return weights._fingerprint(ctx, _open_model(sdir, CONFIG),  # type: ignore[arg-type]
                                    CachingSource(open_model(bdir)), role="subject")

    monkeypatch.setattr(delta_print, "fused_fingerprint", counting)
    new = run()
    assert calls == [1]
    monkeypatch.setattr(delta_print, "fused_supported", lambda *s: False)
    old = run()
    assert calls == [1]
    assert new.screen == old.screen and new.aligned == old.aligned == disguised
    fo = old.fingerprint.raw if disguised else old.fingerprint
    fn = new.fingerprint.raw if disguised else new.fingerprint
    _assert_same((fo, DisguiseScreen()), (fn, DisguiseScreen()))
    if disguised:  # the aligned print is computed the same way on both paths
        assert old.fingerprint.keys() == new.fingerprint.keys()
        for name in old.fingerprint.keys():
            a, b = old.fingerprint.tensors[name], new.fingerprint.tensors[name]
            assert a.sample.tobytes() == b.sample.tobytes()


@pytest.mark.parametrize(("dtype", "compiled"), [(torch.bfloat16, True), (torch.float32, True),
                                                 (torch.float16, False)])
def test_kernel_takes_bf16_and_float32_chunks_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _pass_kind: str,
        dtype: torch.dtype, compiled: bool) -> None:
    """Under the kernel, bf16 and float32 chunks go through the compiled sweep and fp16
    ones through torch; small passes (under ``KERNEL_MIN_ELEMENTS``) never load it. The
    figures are the old path's either way."""
    calls: list[int] = []
    real = delta_kernel.chunk_stats

    def counting(*a: Any, **kw: Any) -> tuple[float, int]:
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(delta_kernel, "chunk_stats", counting)
    base = _base(3)
    sub = _disguise(_finetune(base, 4), seed=7)
    bdir, sdir = _save(base, tmp_path / "b", dtype), _save(sub, tmp_path / "s", dtype)
    _assert_same(_old(open_model(sdir), open_model(bdir)),
                 _new(open_model(sdir), open_model(bdir)))
    assert bool(calls) == (compiled and _pass_kind == "kernel")
