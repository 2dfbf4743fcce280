"""End-to-end audits through the orchestrator: the real local Hub, real tiny models."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from typer.testing import CliRunner

from auditor.cli import app
from auditor.exitcodes import ExitCode
from auditor.hub.client import HubClient
from auditor.orchestrator import audit_revision
from auditor.settings import Settings
from auditor.weights.resident import SHARED_BASES
from tests.fixtures_hub import make_repo

LINEAGE_ONLY = ["pickles", "weights", "lineage"]


@pytest.fixture
def hub(small_zoo, hub_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    server = hub_server(small_zoo.root)
    settings = Settings(
        hub_endpoint=server.url, data_dir=tmp_path / "data", cache_dir=tmp_path / "cache"
    )
    return server, settings, HubClient.from_settings(settings)


def _published(small_zoo, *, exclude: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        e.repo_id
        for e in small_zoo.manifest.entries
        if e.published and e.kind != "base" and e.repo_id != exclude
    ]


def _rules(report) -> dict[str, set[str | None]]:  # type: ignore[no-untyped-def]
    out: dict[str, set[str | None]] = {}
    for f in report.findings:
        out.setdefault(f.rule_id, set()).add(f.related_repo)
    return out


def test_undeclared_merge_is_attributed_with_coefficients(small_zoo, hub) -> None:  # type: ignore[no-untyped-def]
    _, settings, client = hub
    truth = next(e for e in small_zoo.manifest.entries if e.repo_id == "erin/tiny-blend")
    outcome = audit_revision(
        "erin/tiny-blend",
        against=_published(small_zoo, exclude="erin/tiny-blend"),
        settings=settings,
        client=client,
        detectors=LINEAGE_ONLY,
    )
    report = outcome.report
    assert report.subject.revision == client.resolve("erin/tiny-blend").revision
    assert len(report.subject.revision) == 40
    assert report.merge.is_merge
    parents = {e.repo_id: e for e in report.lineage if e.relation == "merge_parent"}
    assert set(parents) == {p.repo_id for p in truth.parents}
    for p in truth.parents:
        assert parents[p.repo_id].coefficient == pytest.approx(p.coefficient, abs=0.05)
    assert _rules(report)["AUD101"] == set(parents)
    assert outcome.exit_code == ExitCode.FINDINGS
    assert outcome.fingerprint is not None
    # Analyses that did not run are null, never invented.
    assert all(e.barrier is None for e in report.lineage)
    assert report.protection.merge_resistant is None


def test_declared_merge_is_informational(small_zoo, hub) -> None:  # type: ignore[no-untyped-def]
    _, settings, client = hub
    outcome = audit_revision(
        "dave/tiny-soup",
        against=_published(small_zoo, exclude="dave/tiny-soup"),
        settings=settings,
        client=client,
        detectors=LINEAGE_ONLY,
    )
    rules = _rules(outcome.report)
    assert "AUD101" not in rules
    assert rules["AUD102"] == {"alice/tiny-copy", "bob/tiny-kv"}
    # The base comes from the parents' own cards when a merge card lists its parents.
    assert outcome.report.subject.base_repo_id == "tinylab/tiny-base"


def test_clone_is_reported(small_zoo, hub) -> None:  # type: ignore[no-untyped-def]
    _, settings, client = hub
    outcome = audit_revision(
        "mallory/tiny-kv-v2",
        against=_published(small_zoo, exclude="mallory/tiny-kv-v2"),
        settings=settings,
        client=client,
        detectors=LINEAGE_ONLY,
    )
    clones = [e.repo_id for e in outcome.report.lineage if e.relation == "clone"]
    assert clones == ["bob/tiny-kv"]
    assert _rules(outcome.report)["AUD103"] == {"bob/tiny-kv"}


def test_fine_tune_of_base_is_clean(small_zoo, hub) -> None:  # type: ignore[no-untyped-def]
    _, settings, client = hub
    outcome = audit_revision(
        "carol/tiny-animals",
        against=["alice/tiny-copy", "bob/tiny-kv"],
        settings=settings,
        client=client,
        detectors=LINEAGE_ONLY,
    )
    assert {e.relation for e in outcome.report.lineage} == {"unrelated"}
    assert outcome.report.active_findings == []
    assert outcome.exit_code == ExitCode.CLEAN


class _Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, ("echo pwned",))


def test_pickle_only_repo_is_scanned_not_loaded(tmp_path: Path, hub_server) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "hub"
    repo = make_repo(root, "evil/pickled", card={"base_model": "org/base"}, files={})
    # The bytes of a pickle that would run os.system; written, never loaded.
    (repo / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    server = hub_server(root)
    settings = Settings(hub_endpoint=server.url, data_dir=tmp_path / "d", cache_dir=tmp_path / "c")
    outcome = audit_revision("evil/pickled", settings=settings)
    report = outcome.report
    assert report.pickles and any("system" in i for i in report.pickles[0].dangerous_imports)
    assert "AUD301" in _rules(report)
    assert outcome.exit_code == ExitCode.FINDINGS
    assert report.lineage == []
    # What needs weights says so as skipped checks: not errors, not file issues.
    assert report.errors == [] and not any(i.kind == "skipped" for i in report.file_issues)
    assert {s.detector for s in report.skipped} == {
        "weights", "lineage", "provenance", "behaviour", "barrier", "equivalence", "protection",
        "backdoor"}
    assert "no safetensors" in next(s.reason for s in report.skipped if s.detector == "weights")


def test_cli_exit_codes_and_formats(small_zoo, hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, _, _ = hub
    runner = CliRunner()
    env = {
        "AUDITOR_HUB_ENDPOINT": server.url,
        "AUDITOR_DATA_DIR": str(tmp_path / "data"),
        "AUDITOR_CACHE_DIR": str(tmp_path / "cache"),
    }
    sarif_path = tmp_path / "out.sarif"
    result = runner.invoke(
        app,
        ["audit", "mallory/tiny-kv-v2", "--against", "bob/tiny-kv", "--format", "sarif",
         "--output", str(sarif_path), "-q"],
        env=env,
    )
    assert result.exit_code == ExitCode.FINDINGS, result.output
    sarif = json.loads(sarif_path.read_text())
    assert sarif["version"] == "2.1.0"
    assert any(r["ruleId"] == "AUD103" for r in sarif["runs"][0]["results"])

    # A repo with nothing to scan: exit 3.
    empty = make_repo(small_zoo.root.parent / "empty-hub", "nobody/empty", files={})
    result = runner.invoke(app, ["audit", str(empty), "-q"], env=env)
    assert result.exit_code == ExitCode.NOTHING_SCANNED, result.output

    # No base anywhere: a clear error, exit 2.
    folder = small_zoo.path("tinylab/tiny-base")
    result = runner.invoke(app, ["audit", str(folder), "-q"], env=env)
    assert result.exit_code == ExitCode.ERROR
    assert "base" in result.output.lower()


def test_cli_store_records_the_audit_once(small_zoo, hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    server, _, _ = hub
    env = {
        "AUDITOR_HUB_ENDPOINT": server.url,
        "AUDITOR_DATA_DIR": str(tmp_path / "data"),
        "AUDITOR_CACHE_DIR": str(tmp_path / "cache"),
    }
    args = ["audit", "mallory/tiny-kv-v2", "--against", "bob/tiny-kv", "--store", "-q"]
    runner = CliRunner()
    for _ in range(2):  # recording the same revision again replaces, never duplicates
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == ExitCode.FINDINGS, result.output
    db = sqlite3.connect(tmp_path / "data" / "auditor.db")
    assert db.execute("select count(*), min(status) from audits").fetchone() == (1, "done")
    assert db.execute(
        "select rule_id, related_repo from findings where rule_id = 'AUD103'"
    ).fetchall() == [("AUD103", "bob/tiny-kv")]
    assert db.execute("select count(*) from fingerprints").fetchone() == (1,)


def test_malformed_weights_are_an_error_not_clean(small_zoo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    folder = tmp_path / "mallory" / "broken"
    shutil.copytree(small_zoo.path("bob/tiny-kv"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    result = CliRunner().invoke(
        app,
        ["audit", str(folder), "--base", str(small_zoo.path("tinylab/tiny-base")), "-q"],
        env={"AUDITOR_DATA_DIR": str(tmp_path / "data")},
    )
    assert result.exit_code == ExitCode.ERROR, result.output
    report = json.loads(result.stdout)
    assert report["lineage"] == [] and any(e["detector"] == "weights" for e in report["errors"])
    assert any(i["kind"] == "weights" for i in report["file_issues"])


def test_reduced_compute_plan_cuts_protection_homologues(  # type: ignore[no-untyped-def]
        small_zoo, hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compute budget too small for the full probe set (a large model on the CPU) makes
    the protection check merge with fewer homologues, and the report says so. The second
    audit finds every candidate's fingerprint in the cache (their weights are not read):
    the protection check still gets its homologues, fetched when it needs them."""
    import auditor.analysis.protection as protection

    _, settings, client = hub
    seen: list[int] = []
    real = protection.assess_protection

    def spy(*args, homologues, **kw):  # type: ignore[no-untyped-def]
        seen.append(len(homologues))
        return real(*args, homologues=homologues, **kw)

    monkeypatch.setattr(protection, "assess_protection", spy)
    against = ["alice/tiny-copy", "bob/tiny-kv", "dave/tiny-soup", "mallory/tiny-kv-v2"]
    SHARED_BASES.clear()
    for flops in (None, 1.0):
        s = settings if flops is None else settings.model_copy(update={"cpu_probe_flops": flops})
        out = audit_revision("carol/tiny-animals", against=against, settings=s, client=client,
                             detectors=["pickles", "weights", "lineage", "behaviour",
                                        "protection"])
        # the behavioural stage took the memory of the base the weights stage held
        assert "behaviour" in out.report.timings and len(SHARED_BASES) == 0
        budget = [i.message for i in out.report.file_issues if i.kind == "budget"]
        assert bool(budget) == (flops is not None)
        if budget:
            assert "protection merges with 2 homologues" in budget[0]
    assert seen[0] >= 3 and seen[1] == 2
