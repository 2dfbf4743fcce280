"""``auditor audit`` for a person and for CI: --fail-on, the human summary, errors that say
what to do (also with -q), a report written on error, --output everywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from auditor.cli import app
from auditor.exitcodes import ExitCode
from auditor.schema import AuditReport

SOUP = "dave/tiny-soup"  # a declared merge: informational findings only
CLONE = "mallory/tiny-kv-v2"  # a re-upload of bob/tiny-kv: a high finding
BLEND = "erin/tiny-blend"  # an undeclared merge of bob/tiny-kv and carol/tiny-animals


@pytest.fixture
def env(small_zoo, hub_server, tmp_path: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    server = hub_server(small_zoo.root)
    return {"AUDITOR_HUB_ENDPOINT": server.url, "AUDITOR_DATA_DIR": str(tmp_path / "data"),
            "AUDITOR_CACHE_DIR": str(tmp_path / "cache")}


def _run(args: list[str], env: dict[str, str]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, args, env=env)


def test_fail_on_threshold_and_info_never_fails(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "soup.json"
    r = _run(["audit", SOUP, "--against", "alice/tiny-copy", "--against", "bob/tiny-kv",
              "--output", str(out), "-q"], env)
    report = AuditReport.model_validate_json(out.read_text())
    assert report.active_findings, "the declared merge gives informational findings"
    assert {f.severity.value for f in report.active_findings} == {"info"}
    assert r.exit_code == ExitCode.CLEAN, r.output

    clone = ["audit", CLONE, "--against", "bob/tiny-kv", "-q", "--output",
             str(tmp_path / "c.json")]
    assert _run(clone, env).exit_code == ExitCode.FINDINGS  # high >= low (the default)
    assert _run([*clone, "--fail-on", "high"], env).exit_code == ExitCode.FINDINGS
    assert _run([*clone, "--fail-on", "critical"], env).exit_code == ExitCode.CLEAN
    assert _run([*clone, "--fail-on", "never"], env).exit_code == ExitCode.CLEAN
    bad = _run([*clone, "--fail-on", "info"], env)
    assert bad.exit_code == ExitCode.ERROR and "info findings never fail" in bad.output


def test_human_summary_names_comparison_verdict_owner_and_coefficient(
        env: dict[str, str]) -> None:
    r = _run(["audit", BLEND, "--against", "bob/tiny-kv", "--against", "carol/tiny-animals",
              "--format", "text"], env)
    assert r.exit_code == ExitCode.FINDINGS, r.output
    text = r.stdout
    assert "compared with base tinylab/tiny-base and 2 candidates" in text
    assert "verdict: Undeclared merge" in text
    assert "bob/tiny-kv (owner bob, coefficient 0." in text
    assert "carol/tiny-animals (owner carol, coefficient 0." in text
    assert "exit 1" in text
    assert not text.lstrip().startswith("{")  # a summary, not JSON


def test_no_candidates_is_said_not_hidden(env: dict[str, str]) -> None:
    r = _run(["audit", BLEND, "--format", "text"], env)
    assert "0 candidates" in r.stdout and "no candidates" in r.stdout
    assert "verdict: Clean" not in r.stdout
    assert "--against" in r.stdout
    assert "not run: lineage: no candidates to compare against" in r.stdout


def test_bad_revision_is_named_even_with_q_and_a_report_is_written(
        env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "err.sarif"
    r = _run(["audit", BLEND, "--revision", "nope", "-q", "--format", "sarif",
              "--output", str(out)], env)
    assert r.exit_code == ExitCode.ERROR
    assert "'nope'" in r.stderr and "--revision" in r.stderr
    sarif = json.loads(out.read_text())
    notes = sarif["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert "nope" in notes[0]["message"]["text"]


def test_bad_against_fails_before_any_download(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "err.json"
    r = _run(["audit", BLEND, "--against", "ghost/missing", "-q", "--output", str(out)], env)
    assert r.exit_code == ExitCode.ERROR
    assert "--against ghost/missing" in r.stderr
    assert not list(Path(env["AUDITOR_CACHE_DIR"]).rglob("*.safetensors"))
    report = AuditReport.model_validate_json(out.read_text())
    assert report.findings == [] and "ghost/missing" in report.errors[0].message
    assert report.errors[0].detector == "audit" and report.errors[0].kind == "RepoNotFound"


def test_unreachable_card_base_names_endpoint_and_base_option(
        small_zoo, env: dict[str, str], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "erin" / "orphan"
    shutil.copytree(small_zoo.path("alice/tiny-copy"), folder)
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("tinylab/tiny-base", "ghost/base"))
    r = _run(["audit", str(folder), "-q"], env)
    assert r.exit_code == ExitCode.ERROR
    assert "ghost/base" in r.stderr and "--base" in r.stderr
    assert env["AUDITOR_HUB_ENDPOINT"] in r.stderr
    down = _run(["audit", BLEND, "-q", "--endpoint", "http://127.0.0.1:9"], env)
    assert down.exit_code == ExitCode.ERROR and "http://127.0.0.1:9" in down.stderr


def test_nothing_scanned_is_not_reported_clean(env: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "nobody" / "empty"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("no weights here\n")
    r = _run(["audit", str(folder), "--format", "text"], env)
    assert r.exit_code == ExitCode.NOTHING_SCANNED
    assert "nothing scanned" in r.stdout and "no findings" not in r.stdout


def test_report_commands_take_output_and_keep_old_spellings(
        env: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "r.json"
    _run(["audit", CLONE, "--against", "bob/tiny-kv", "-q", "--output", str(src)], env)
    for flag in ("--output", "-o", "--out"):
        dest = tmp_path / f"r{flag.strip('-')}.html"
        r = _run(["report", "render", str(src), "--format", "html", flag, str(dest)], env)
        assert r.exit_code == 0, r.output
        assert "<html" in dest.read_text()
    for flag in ("--output", "--out"):
        site = tmp_path / f"site{flag.strip('-')}"
        r = _run(["report", "build", flag, str(site)], env)
        assert r.exit_code == 0, r.output
        assert (site / "index.html").exists()


def test_on_demand_audit_compares_with_what_the_store_knows(env: dict[str, str]) -> None:
    # Parents audited earlier (--store) are candidates later without --against.
    for parent in ("bob/tiny-kv", "carol/tiny-animals"):
        r = _run(["audit", parent, "--store", "-q", "--output", "/dev/null"], env)
        # the first one compares against nothing yet: incomplete (2), never clean
        assert r.exit_code in (ExitCode.CLEAN, ExitCode.FINDINGS, ExitCode.ERROR), r.output
        assert "error:" not in r.output
    r = _run(["audit", BLEND, "--format", "text"], env)
    assert "0 downloaded with --against, 2 known from the store" in r.stdout, r.stdout
    assert "bob/tiny-kv (owner bob" in r.stdout and r.exit_code == ExitCode.FINDINGS
