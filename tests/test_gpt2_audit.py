"""Audits of a GPT-2-style zoo: Conv1D (transposed) weights, fused ``c_attn``, a tied head.

The "gpt2-small" zoo mirrors "small" on a ``GPT2LMHeadModel`` base; its repos are saved as
the Hub saves tied models (no ``lm_head.weight``). Audits run on local folders (no server).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from auditor.exitcodes import ExitCode
from auditor.orchestrator import AuditOutcome, audit_revision
from auditor.settings import Settings
from tests.fixtures_zoo import BuiltZoo, build_cached_zoo

LINEAGE_ONLY = ["pickles", "weights", "lineage"]
MERGE = "erin/gpt2-blend"
CLONE = "mallory/gpt2-kv-v2"


@pytest.fixture(scope="session")
def gpt2_zoo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BuiltZoo:
    """The "gpt2-small" zoo, built once per checkout into the pytest cache (read-only)."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        root = Path(cache.mkdir("auditor-zoo-gpt2-small"))
    else:
        root = tmp_path_factory.mktemp("zoo") / "gpt2-small"
    return build_cached_zoo(root, "gpt2-small")


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


def _audit(zoo: BuiltZoo, repo_id: str, tmp_path: Path, *, subject: Path | None = None,
           detectors: list[str] | None = LINEAGE_ONLY) -> AuditOutcome:
    """Audit a zoo repo (or ``subject``, a folder) against every other published non-base
    repo of the zoo; local folders are reported under their ``org/name``."""
    m = zoo.manifest
    against = [str(zoo.path(e.repo_id)) for e in m.published()
               if e.kind != "base" and e.repo_id != repo_id]
    return audit_revision(
        str(subject or zoo.path(repo_id)),
        base=str(zoo.path(m.base.repo_id)),
        against=against,
        settings=_settings(tmp_path),
        detectors=detectors,
    )


def _rules(outcome: AuditOutcome) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = {}
    for f in outcome.report.findings:
        out.setdefault(f.rule_id, set()).add(f.related_repo)
    return out


def test_gpt2_zoo_layout(gpt2_zoo: BuiltZoo) -> None:
    """The zoo really is GPT-2: Conv1D weights stored [in, out], tied head left out."""
    m = gpt2_zoo.manifest
    assert m.spec == "gpt2-small"
    assert [e.kind for e in m.entries] == ["base", "finetune", "finetune", "finetune",
                                          "merge", "clone"]
    sd = load_file(str(gpt2_zoo.path(MERGE) / "model.safetensors"))
    assert "lm_head.weight" not in sd and "transformer.wte.weight" in sd
    # Conv1D: c_attn maps n_embd -> 3 * n_embd and is stored as [in, out].
    assert tuple(sd["transformer.h.0.attn.c_attn.weight"].shape) == (64, 192)
    assert tuple(sd["transformer.h.1.mlp.c_fc.weight"].shape) == (64, 128)


def test_gpt2_undeclared_merge_is_attributed(gpt2_zoo: BuiltZoo, tmp_path: Path) -> None:
    truth = gpt2_zoo.manifest.get(MERGE)
    outcome = _audit(gpt2_zoo, MERGE, tmp_path)
    report = outcome.report
    assert report.errors == []
    assert report.merge.is_merge
    parents = {e.repo_id: e for e in report.lineage if e.relation == "merge_parent"}
    assert set(parents) == {p.repo_id for p in truth.parents}
    for p in truth.parents:
        assert parents[p.repo_id].coefficient == pytest.approx(p.coefficient, abs=0.05)
    assert _rules(outcome)["AUD101"] == set(parents)
    assert outcome.exit_code == ExitCode.FINDINGS


def test_gpt2_clone_is_reported(gpt2_zoo: BuiltZoo, tmp_path: Path) -> None:
    outcome = _audit(gpt2_zoo, CLONE, tmp_path)
    clones = [e.repo_id for e in outcome.report.lineage
              if e.relation == "clone"]
    assert clones == ["bob/gpt2-kv"]
    assert _rules(outcome)["AUD103"] == {"bob/gpt2-kv"}


def test_gpt2_clone_with_head_and_old_names_is_still_a_clone(
    gpt2_zoo: BuiltZoo, tmp_path: Path
) -> None:
    """A re-export that differs only in naming (old GPT-2 checkpoints drop the
    ``transformer.`` prefix) and writes the tied head out must still match its source."""
    import shutil

    folder = tmp_path / "hub" / "thief" / "gpt2-kv-renamed"
    shutil.copytree(gpt2_zoo.path("bob/gpt2-kv"), folder)
    sd = load_file(str(folder / "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v for k, v in sd.items()}
    renamed["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    # Audited against every published repo, the zoo's clone of bob included.
    outcome = _audit(gpt2_zoo, "thief/gpt2-kv-renamed", tmp_path, subject=folder)
    report = outcome.report
    assert report.subject.repo_id == "thief/gpt2-kv-renamed"
    assert report.errors == []
    relation = {e.repo_id: e.relation for e in report.lineage}
    # The original and the zoo's (byte-identical) clone of it are the same weights.
    assert relation["bob/gpt2-kv"] == "clone" and relation[CLONE] == "clone"
    assert relation["alice/gpt2-copy"] == "unrelated"
    assert relation[MERGE] != "clone"
    assert "AUD103" in _rules(outcome)


def test_gpt2_merge_and_base_weights_relate_exactly(gpt2_zoo: BuiltZoo) -> None:
    """Ground truth check on the saved files: the merge is base + 0.7 tau_kv + 0.5 tau_an."""
    def sd(repo: str) -> dict[str, torch.Tensor]:
        return load_file(str(gpt2_zoo.path(repo) / "model.safetensors"))

    base, kv, an, merge = (sd(r) for r in ("gpt2lab/gpt2-tiny-base", "bob/gpt2-kv",
                                           "carol/gpt2-animals", MERGE))
    for k in base:
        expect = base[k] + 0.7 * (kv[k] - base[k]) + 0.5 * (an[k] - base[k])
        torch.testing.assert_close(merge[k], expect, atol=1e-5, rtol=0)


def test_gpt2_full_detector_set_runs_cleanly(gpt2_zoo: BuiltZoo, tmp_path: Path) -> None:
    """barrier / equivalence / protection / backdoor load GPT-2 through analysis.modeling:
    they must run (not skip) and agree with lineage on the clone."""
    outcome = _audit(gpt2_zoo, CLONE, tmp_path, detectors=None)
    report = outcome.report
    assert report.errors == [] and report.file_issues == []
    assert {"barrier", "protection", "backdoor"} <= set(report.timings)
    curves = {c.other_repo_id: c for c in report.barriers}
    assert "bob/gpt2-kv" in curves and "carol/gpt2-animals" in curves
    # A clone sits on a flat path to its source: every point has the same loss.
    source = curves["bob/gpt2-kv"]
    assert max(source.losses) - min(source.losses) < 1e-4
    assert source.barrier == pytest.approx(0.0, abs=1e-4)
    assert report.protection.merge_resistant is False
    assert report.backdoor.suspected is False
    assert _rules(outcome) == {"AUD103": {"bob/gpt2-kv"}}
    assert outcome.exit_code == ExitCode.FINDINGS
