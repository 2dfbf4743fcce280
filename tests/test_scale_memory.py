"""Single-read behavioural checks: resident subject, blockwise combining, shared endpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import auditor.analysis.modeling as modeling
from auditor.analysis.barrier import function_distance, loss_path, model_log_probs
from auditor.analysis.compute import compute_dtype
from auditor.analysis.modeling import build_model, combine_into
from auditor.weights.dict_sources import DictTensorSource
from auditor.weights.reader import open_model
from auditor.weights.resident import ResidentSource
from tests.test_barrier import Trained, probes, trained


@pytest.fixture(scope="module")
def zoo() -> Trained:
    return trained()


def test_resident_source_reads_once_in_the_stored_dtype(tmp_path: Path) -> None:
    t = {"a": torch.randn(6, 4).bfloat16(), "b": torch.randn(3)}
    save_file(t, str(tmp_path / "model.safetensors"))
    src = open_model(tmp_path)
    res = ResidentSource(src)
    src.close()  # nothing is read from the file after construction
    assert res.get_stored("a").dtype == torch.bfloat16
    assert torch.equal(res.get("a"), t["a"].float())
    assert torch.equal(res.get_rows("a", 2, 5), t["a"].float()[2:5])
    assert res.get("b").dtype == torch.float32 and torch.equal(res.get("b"), t["b"])
    res.get("a").add_(1.0)  # a caller's copy: the held tensor is unchanged
    assert torch.equal(res.get("a"), t["a"].float())
    assert res.nbytes == 6 * 4 * 2 + 3 * 4
    # a computed source is held in the dtype asked for
    assert ResidentSource(DictTensorSource(t), dtype=torch.bfloat16).get_stored("b").dtype \
        == torch.bfloat16


def test_row_reads_without_a_mapping(tmp_path: Path) -> None:
    t = {"w": torch.randn(10, 3).bfloat16(), "s": torch.tensor(2.0)}
    save_file(t, str(tmp_path / "model.safetensors"))
    with open_model(tmp_path) as src:
        assert torch.equal(src.get_rows("w", 3, 7), t["w"].float()[3:7])
        assert torch.equal(src.get_rows("w", 8, 20), t["w"].float()[8:])  # clamped
        assert src._open_handle is None  # pread mode never maps the shard
        assert src.get_stored("w").dtype == torch.bfloat16


def test_blockwise_combine_equals_whole_tensors(
    zoo: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    terms = [(0.25, zoo.base), (0.5, zoo.copy_a), (0.25, zoo.copy_b)]
    whole = build_model(zoo.spec, zoo.base)
    combine_into(whole, terms)
    monkeypatch.setattr(modeling, "_BLOCK_ELEMENTS", 64)  # every matrix in several blocks
    blocks = build_model(zoo.spec, zoo.base)
    combine_into(blocks, terms)
    for (name, a), (_, b) in zip(whole.state_dict().items(), blocks.state_dict().items(),
                                 strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    # a lone term is copied as stored (no float32 round trip needed) and exactly
    combine_into(blocks, [(1.0, ResidentSource(DictTensorSource(zoo.copy_a)))])
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(blocks.state_dict()[name], zoo.copy_a[name])


def test_curves_share_the_subject_endpoint(zoo: Trained) -> None:
    work = build_model(zoo.spec, zoo.base)
    p = probes()
    full = loss_path(zoo.spec, zoo.copy_a, zoo.copy_b, probes=p, points=5, model=work)
    passes = p.cost.forward_passes
    shared = loss_path(zoo.spec, zoo.copy_a, zoo.copy_b, probes=p, points=5, model=work,
                       start_loss=full.losses[0])
    assert p.cost.forward_passes - passes == 4 * len(list(p.batches()))  # alpha 0 skipped
    assert shared.losses == pytest.approx(full.losses, rel=1e-6)
    combine_into(work, [(1.0, zoo.copy_a)])
    ref = model_log_probs(zoo.spec, work, probes=p)
    plain = function_distance(zoo.spec, zoo.copy_a, zoo.sort_c, probes=p, model=work)
    reused = function_distance(zoo.spec, zoo.copy_a, zoo.sort_c, probes=p, model=work,
                               reference=ref)
    assert reused == pytest.approx(plain, rel=1e-6)


def test_a_1b_model_computes_in_its_stored_dtype_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    # float32 working model + a bf16 resident subject: 7.4 GB for 1.24B parameters, more
    # than half of the default 8 GiB host budget
    assert compute_dtype(cpu, torch.bfloat16, n_params=1_240_000_000,
                         host_budget=8 * 1024**3) == torch.bfloat16
    assert compute_dtype(cpu, torch.bfloat16, n_params=100_000_000,
                         host_budget=8 * 1024**3) == torch.float32
