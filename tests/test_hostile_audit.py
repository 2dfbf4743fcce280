"""The hostile corpus (tests/hostile_corpus.py) through ``auditor audit`` and ``report build``.

Every case: exit code 1 (the gadget pickle next to the breakage is still reported; a case
that only breaks things would give 2), no traceback, only finite JSON numbers, the expected
finding or file issue, the payload never runs. All cases are stored in one SQLite store and
one ``report build`` renders them all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from auditor.cli import app
from tests import hostile_corpus as hc

CASES = hc.cases()
# NaN / Infinity as a number (in SVG coordinates, JSON, tables), not in prose ("NaN or").
NAN_NUMBER = re.compile(r"(?<![A-Za-z ])(?:NaN|-?Infinity)(?![A-Za-z ])")


def strict_json(text: str) -> Any:
    """Parse refusing NaN / Infinity (what any strict consumer of our output does)."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"non-finite number {token} in output")

    return json.loads(text, parse_constant=refuse)


class Env:
    def __init__(self, root: Path, url: str, tmp: Path, marker: Path) -> None:
        self.root = root
        self.url = url
        self.tmp = tmp
        self.marker = marker
        self.env = {"AUDITOR_DATA_DIR": str(tmp / "data"), "AUDITOR_CACHE_DIR": str(tmp / "cache"),
                    "AUDITOR_HUB_ENDPOINT": url, "AUDITOR_DATABASE_URL": ""}

    def run(self, *args: str) -> Any:
        result = CliRunner().invoke(app, list(args), env=self.env, catch_exceptions=True)
        # A crash would surface as an exception other than the exit itself.
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"{args}: {result.exception!r}")
        out = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert "Traceback" not in out, out[-2000:]
        return result


@pytest.fixture(scope="module")
def hostile_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from auditor_testkit.hub.server import HubServer

    tmp = tmp_path_factory.mktemp("hostile")
    root = tmp / "hub"
    marker = tmp / "PAYLOAD-RAN"
    hc.write_hub(root, marker)
    server = HubServer(root).start()
    try:
        yield Env(root, server.url, tmp, marker)
    finally:
        server.stop()
    assert not marker.exists(), "a pickle payload ran"


def test_corpus_covers_every_class() -> None:
    classes = {c.klass for c in CASES}
    assert classes >= {"nonfinite", "side_files", "pickles", "amplification", "headers",
                       "cycles"}
    assert len(CASES) >= 40
    assert len({c.repo_id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case_through_audit(hostile_hub: Env, case: hc.Case) -> None:
    out = hostile_hub.tmp / "reports" / f"{case.name}.json"
    result = hostile_hub.run("audit", case.repo_id, *case.args, "--format", "json",
                             "--output", str(out), "--store", "-q")
    report = strict_json(out.read_text())
    rules = {f["rule_id"] for f in report["findings"]}
    problems = [i["message"] for i in report["file_issues"]] + [
        f'{e["detector"]}: {e["kind"]}: {e["message"]}' for e in report["errors"]]
    assert result.exit_code == 1, (result.exit_code, rules, problems)
    assert set(case.expect_rules) <= rules, (rules, problems)
    if case.expect_issue:
        assert any(case.expect_issue in p for p in problems), problems
    if case.klass == "pickles":
        assert all(p["dangerous_imports"] for p in report["pickles"]), report["pickles"]
    # The revision is the Hub's commit, never a local tree's hash.
    assert report["subject"]["repo_id"] == case.repo_id
    assert not hostile_hub.marker.exists()


@pytest.mark.parametrize("fmt", ["sarif", "html"])
def test_nonfinite_weights_in_every_format(hostile_hub: Env, fmt: str) -> None:
    out = hostile_hub.tmp / "reports" / f"nan.{fmt}"
    result = hostile_hub.run("audit", "hostile/nan-one-tensor", "--format", fmt,
                             "--output", str(out), "-q")
    assert result.exit_code == 1  # never "clean"
    text = out.read_text()
    assert "AUD501" in text
    if fmt == "sarif":
        log = strict_json(text)
        assert any(r["ruleId"] == "AUD501" for r in log["runs"][0]["results"])
    else:
        assert not NAN_NUMBER.search(text)


def test_report_build_over_every_case(hostile_hub: Env) -> None:
    """After the corpus ran with --store: the site builds, every page is finite."""
    for case in CASES[:3]:  # in case this test runs alone
        hostile_hub.run("audit", case.repo_id, *case.args, "--store", "-q", "--output",
                        str(hostile_hub.tmp / "reports" / "again.json"))
    site = hostile_hub.tmp / "site"
    result = hostile_hub.run("report", "build", "--out", str(site))
    assert result.exit_code == 0, result.output
    assert (site / "index.html").is_file()
    pages = list(site.rglob("*.html"))
    assert len(pages) > 3
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not NAN_NUMBER.search(text), page
        assert str(hostile_hub.tmp) not in text, page  # no internal paths
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{hostile_hub.tmp / 'data' / 'auditor.db'}")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT report FROM audits WHERE report IS NOT NULL")).all()
        statuses = {s for (s,) in conn.execute(text("SELECT status FROM audits"))}
    engine.dispose()
    assert rows and statuses <= {"done", "failed", "skipped"}
    for (raw,) in rows:
        strict_json(raw if isinstance(raw, str) else json.dumps(raw))


def test_repo_id_matching_a_local_folder_stays_a_hub_id(hostile_hub: Env, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder named like the repo id in the working directory is never what is audited."""
    decoy = tmp_path / "hostile" / "nan-one-tensor"
    decoy.mkdir(parents=True)
    (decoy / "README.md").write_text("---\nbase_model: nobody/none\n---\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    result = hostile_hub.run("audit", "hostile/nan-one-tensor", "--output", str(out), "-q")
    report = strict_json(out.read_text())
    assert result.exit_code == 1
    assert report["subject"]["base_repo_id"] == hc.BASE_ID  # the Hub repo's card, not the decoy
    assert "AUD501" in {f["rule_id"] for f in report["findings"]}
    # Spelt as a path it is the local folder (which has no weights: nothing scanned, 3).
    assert hostile_hub.run("audit", "./hostile/nan-one-tensor", "-q").exit_code == 3


def test_long_local_folder_names_are_stored(hostile_hub: Env, tmp_path: Path) -> None:
    """Folder names of 250 characters (ids over the Hub's 96 per part) are stored."""
    import shutil

    owner = tmp_path / ("o" * 250)
    folder = owner / ("n" * 250)
    shutil.copytree(hostile_hub.root / "hostile" / "nan-one-tensor", folder)
    base = tmp_path / "b" / "base"
    shutil.copytree(hostile_hub.root / hc.BASE_ID, base)
    out = tmp_path / "r.json"
    result = hostile_hub.run("audit", str(folder), "--base", str(base), "--store", "-q",
                             "--output", str(out))
    report = strict_json(out.read_text())
    assert result.exit_code == 1
    owner_id, name_id = report["subject"]["repo_id"].split("/")
    assert len(owner_id) <= 96 and len(name_id) <= 96 and name_id.startswith("nnnn")
