"""The real-shape family (test-sized), the content-keyed fingerprint cache, stored
homologues in on-demand audits, coverage, and adapters as full homologues."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from auditor.orchestrator import audit_revision
from auditor.settings import Settings
from auditor.weights.reader import open_model
from auditor_testkit.factory.realshape import (
    TINY,
    Disguise,
    Recipe,
    TaskVector,
    synthetic_fingerprint,
    write_lora,
    write_model,
)
from auditor_testkit.factory.save import CardSpec

WEIGHTS_ONLY = ["pickles", "weights", "lineage"]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("realshape")
    t1, t2, t3 = TaskVector(seed=11), TaskVector(seed=12), TaskVector(seed=13)
    base = "org/base"
    out: dict[str, Path] = {}
    out["base"] = write_model(root, base, Recipe(base_seed=1), TINY, card=CardSpec()).path
    for name, tau in (("ft1", t1), ("ft2", t2), ("ft3", t3)):
        out[name] = write_model(root, f"org/{name}", Recipe(base_seed=1, taus=(tau,),
                                                            coefs=(1.0,)), TINY,
                                card=CardSpec(base_model=base)).path
    merge = Recipe(base_seed=1, taus=(t1, t2), coefs=(0.6, 0.4), method="linear",
                   disguise=Disguise(seed=5))
    out["merge"] = write_model(root, "thief/merge", merge, TINY,
                               card=CardSpec(base_model=base)).path
    out["lora"] = write_lora(root, "org/lora", base_repo=base, rs=TINY, seed=3).path
    return out


def _settings(tmp: Path) -> Settings:
    return Settings(data_dir=tmp / "data", cache_dir=tmp / "cache")


def test_family_layout(family: dict[str, Path]) -> None:
    folder = family["ft1"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_key_value_heads"] == TINY.kv_heads and cfg["tie_word_embeddings"]
    assert (folder / "model.safetensors.index.json").is_file()  # sharded
    src = open_model(folder)
    assert src.dtype("model.embed_tokens.weight") == "BF16"  # type: ignore[attr-defined]
    assert set(src.keys()) == set(TINY.shapes())
    tau = src.get("model.layers.0.mlp.up_proj.weight") - open_model(family["base"]).get(
        "model.layers.0.mlp.up_proj.weight")
    s = torch.linalg.svdvals(tau)
    # low-rank plus noise: the top 8 singular values carry most of the energy
    assert float(s[:8].pow(2).sum() / s.pow(2).sum()) > 0.5


def test_disguised_merge_recognised_and_cached(family: dict[str, Path], tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    against = [str(family[n]) for n in ("ft1", "ft2", "ft3", "lora")]
    first = audit_revision(str(family["merge"]), base=str(family["base"]), against=against,
                           settings=settings, detectors=WEIGHTS_ONLY)
    assert first.report.merge.is_merge
    parents = {e.repo_id: e for e in first.report.lineage if e.relation == "merge_parent"}
    assert set(parents) == {"org/ft1", "org/ft2"}
    assert math.isclose(parents["org/ft1"].coefficient or 0, 0.6, abs_tol=0.05)
    assert math.isclose(parents["org/ft2"].coefficient or 0, 0.4, abs_tol=0.05)
    assert all(e.aligned for e in parents.values())  # the disguise was recognised
    assert first.report.coverage["candidates_compared"] == 4
    assert first.report.coverage["fingerprints_cached"] == 0
    # second audit: every fingerprint comes from the cache, nothing is aligned again
    again = audit_revision(str(family["merge"]), base=str(family["base"]), against=against,
                           settings=settings, detectors=WEIGHTS_ONLY)
    assert again.report.coverage["fingerprints_cached"] == 5  # subject + 4 candidates
    assert {e.repo_id for e in again.report.lineage if e.relation == "merge_parent"} == \
        set(parents)
    # without --against, the cached homologues of the same base are compared
    stored = audit_revision(str(family["merge"]), base=str(family["base"]),
                            settings=settings, detectors=WEIGHTS_ONLY)
    assert stored.report.coverage["candidates_compared"] == 4
    assert {e.repo_id for e in stored.report.lineage if e.relation == "merge_parent"} == \
        set(parents)
    off = Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                   compare_stored=False)
    alone = audit_revision(str(family["merge"]), base=str(family["base"]), settings=off,
                           detectors=WEIGHTS_ONLY)
    assert alone.report.coverage["candidates_compared"] == 0
    assert any(s.detector == "lineage" and "no candidates" in s.reason
               for s in alone.report.skipped)


def test_cli_says_incomplete_when_compared_against_nothing(
    family: dict[str, Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from auditor.cli import app
    from auditor.exitcodes import ExitCode

    env = {"AUDITOR_DATA_DIR": str(tmp_path / "data"), "AUDITOR_CACHE_DIR": str(tmp_path / "c")}
    res = CliRunner().invoke(app, ["audit", str(family["ft3"]), "--base", str(family["base"]),
                                   "--no-stored"], env=env)
    assert res.exit_code == ExitCode.ERROR, res.output
    assert "0 candidates" in res.output and "not checked" in res.output


def test_adapter_is_a_full_homologue_for_behaviour(family: dict[str, Path],
                                                    tmp_path: Path) -> None:
    out = audit_revision(str(family["lora"]), base=str(family["base"]),
                         against=[str(family["ft1"])], settings=_settings(tmp_path),
                         detectors=[*WEIGHTS_ONLY, "barrier"])
    assert out.report.barriers, [i.message for i in out.report.file_issues]
    assert not any("adapter" in e or "no weight files" in e for e in out.report.errors)


def test_synthetic_fingerprint_matches_a_built_model(family: dict[str, Path]) -> None:
    from auditor.analysis.fingerprint import compute_fingerprint
    from auditor.analysis.similarity import cosine_report
    from auditor.weights.task_vectors import model_deltas

    deltas, _ = model_deltas(open_model(family["ft1"]), open_model(family["base"]))
    built = compute_fingerprint(deltas)
    synth = synthetic_fingerprint(TaskVector(seed=11), TINY)
    other = synthetic_fingerprint(TaskVector(seed=99), TINY)
    # the same task vector (up to bf16 rounding and independent sampled noise)
    assert cosine_report(built, synth).cosine > 0.6
    assert abs(cosine_report(built, other).cosine) < 0.2


def test_incremental_update_reads_no_weights_and_keeps_behaviour(
    family: dict[str, Path], tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    full = audit_revision(str(family["ft3"]), base=str(family["base"]),
                          against=[str(family["ft1"])], settings=settings,
                          detectors=[*WEIGHTS_ONLY, "barrier"])
    assert full.report.barriers and "behaviour" in full.report.timings
    previous = full.report.model_dump(mode="json")
    # a new homologue arrived: the earlier audit is updated, not redone
    update = audit_revision(str(family["ft3"]), base=str(family["base"]),
                            against=[str(family["ft1"]), str(family["ft2"])],
                            settings=settings, previous=previous)
    assert update.report.coverage["incremental"] == 1
    assert "behaviour" not in update.report.timings  # no model built, no probe run
    assert update.report.coverage["fingerprints_cached"] == 2  # subject + ft1, not ft2
    assert update.report.barriers == full.report.barriers
    assert {e.repo_id for e in update.report.lineage} == {"org/ft1", "org/ft2"}


def test_behaviour_results_reused_for_the_same_models(family: dict[str, Path],
                                                      tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    subject, base = str(family["ft3"]), str(family["base"])
    first = audit_revision(subject, base=base, against=[str(family["ft1"])], settings=settings)
    assert "behaviour" in first.report.timings, first.report.errors
    assert "behaviour_cached" not in first.report.coverage
    again = audit_revision(subject, base=base, against=[str(family["ft1"])], settings=settings)
    assert again.report.coverage.get("behaviour_cached") == 1, first.report.errors
    assert "barrier" not in again.report.timings  # no model built, no weight read for it
    assert again.report.barriers == first.report.barriers
    assert again.report.protection == first.report.protection
    assert again.report.backdoor == first.report.backdoor
    assert [e.barrier for e in again.report.lineage] == [e.barrier for e in first.report.lineage]
    # another comparison set is another key: measured again
    other = audit_revision(subject, base=base, against=[str(family["ft1"]), str(family["ft2"])],
                           settings=settings)
    assert "behaviour_cached" not in other.report.coverage
    assert "behaviour" in other.report.timings
