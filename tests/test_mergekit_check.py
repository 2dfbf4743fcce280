"""mergekit_config.yml compared with the weights: a lie about one weight is a finding that
names it; an honest recipe is confirmed."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import yaml

from auditor.analysis.mergekit_check import check_mergekit, declared_recipe
from auditor.hub.client import HubClient
from auditor.orchestrator import audit_revision
from auditor.schema import LineageEntry, MergeInfo
from auditor.settings import Settings

SUBJECT = "erin/tiny-blend"  # an undeclared task-arithmetic merge of the small zoo


def test_declared_recipe_normalises_linear_and_scales_by_lambda() -> None:
    w = [random.uniform(0.1, 2.0) for _ in range(3)]
    lam = random.uniform(0.5, 1.5)
    linear = {"merge_method": "linear",
              "models": [{"model": f"o/m{i}", "parameters": {"weight": x}}
                         for i, x in enumerate(w)]}
    method, parents = declared_recipe(linear)
    assert method == "linear"
    assert [c for _, c in parents] == pytest.approx([x / sum(w) for x in w])
    ties = {**linear, "merge_method": "ties", "parameters": {"lambda": lam}}
    assert [c for _, c in declared_recipe(ties)[1]] == pytest.approx([x * lam for x in w])
    grad = {"merge_method": "task_arithmetic",
            "models": [{"model": "o/a@main", "parameters": {"weight": [0.2, 0.4, 0.6]}}]}
    assert declared_recipe(grad)[1] == [("o/a", pytest.approx(0.4))]
    slerp = {"merge_method": "slerp", "parameters": {"t": 0.3},
             "slices": [{"sources": [{"model": "o/a"}, {"model": "o/b"}]}]}
    assert declared_recipe(slerp)[1] == [("o/a", pytest.approx(0.7)), ("o/b", pytest.approx(0.3))]


def test_check_flags_only_the_misstated_parent_and_undeclared_ones() -> None:
    true_a, true_b = random.uniform(0.2, 0.8), random.uniform(0.2, 0.8)
    lie = true_b + random.choice([-1, 1]) * random.uniform(0.35, 0.6)
    config = {"merge_method": "task_arithmetic", "parameters": {"normalize": False},
              "models": [{"model": "o/a", "parameters": {"weight": true_a}},
                         {"model": "o/b", "parameters": {"weight": lie}}]}
    lineage = [LineageEntry(repo_id=r, relation="merge_parent", coefficient=c, cosine=0.5)
               for r, c in (("o/a", true_a + 0.02), ("o/b", true_b), ("x/hidden", 0.3))]
    check = check_mergekit(config, lineage=lineage,
                           merge=MergeInfo(is_merge=True, method="task_arithmetic"),
                           base_repo="o/base")
    assert check is not None
    assert check.weight_mismatches == ["o/b"]
    assert check.parent_mismatches == ["x/hidden"]
    assert check.method_status == "confirmed"
    assert not check.confirmed
    assert check_mergekit(None, lineage=lineage, merge=MergeInfo(is_merge=True),
                          base_repo=None) is None


def _published(small_zoo) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.repo_id for e in small_zoo.manifest.entries
            if e.published and e.kind != "base" and e.repo_id != SUBJECT]


def _audit_with_config(small_zoo, hub_server, tmp_path: Path, weights: dict[str, float]):  # type: ignore[no-untyped-def]
    root = tmp_path / "hub"
    shutil.copytree(small_zoo.root, root)
    config = {"merge_method": "task_arithmetic", "base_model": "tinylab/tiny-base",
              "parameters": {"normalize": False}, "dtype": "float32",
              "models": [{"model": r, "parameters": {"weight": w}} for r, w in weights.items()]}
    (small_zoo.manifest.path(root, SUBJECT) / "mergekit_config.yml").write_text(
        yaml.safe_dump(config), encoding="utf-8")
    server = hub_server(root)
    settings = Settings(hub_endpoint=server.url, data_dir=tmp_path / "d",
                        cache_dir=tmp_path / "c")
    return audit_revision(SUBJECT, against=_published(small_zoo), settings=settings,
                          client=HubClient.from_settings(settings),
                          detectors=["pickles", "weights", "lineage"]).report


def test_a_config_lying_about_one_weight_is_a_finding_naming_it(
        small_zoo, hub_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    truth = next(e for e in small_zoo.manifest.entries if e.repo_id == SUBJECT)
    weights = {p.repo_id: p.coefficient for p in truth.parents}
    liar = random.choice(sorted(weights))
    honest = [r for r in weights if r != liar]
    weights[liar] += random.choice([-1, 1]) * random.uniform(0.4, 0.6)
    report = _audit_with_config(small_zoo, hub_server, tmp_path, weights)
    found = [f for f in report.findings if f.rule_id == "AUD701"]
    assert len(found) == 1, [f.rule_id for f in report.findings]
    assert liar in found[0].message
    assert all(h not in found[0].message for h in honest)
    assert report.mergekit is not None and report.mergekit.weight_mismatches == [liar]
    assert not any(f.rule_id == "AUD702" for f in report.findings)


def test_an_honest_config_is_confirmed(small_zoo, hub_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    truth = next(e for e in small_zoo.manifest.entries if e.repo_id == SUBJECT)
    report = _audit_with_config(small_zoo, hub_server, tmp_path,
                                {p.repo_id: p.coefficient for p in truth.parents})
    assert report.mergekit is not None and report.mergekit.confirmed
    assert {p.status for p in report.mergekit.parents} == {"confirmed"}
    assert not any(f.rule_id.startswith("AUD70") for f in report.findings)
