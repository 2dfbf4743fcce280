"""`auditor authorize` + re-evaluation: the finding is suppressed and kept, the pages say
"authorized by OWNER on DATE", `unauthorize` brings it back, new audits apply grants."""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from auditor.cli import app
from auditor.exitcodes import ExitCode

BLEND = "erin/tiny-blend"


@pytest.fixture
def env(small_zoo, hub_server, tmp_path: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    server = hub_server(small_zoo.root)
    return {"AUDITOR_HUB_ENDPOINT": server.url, "AUDITOR_DATA_DIR": str(tmp_path / "data"),
            "AUDITOR_CACHE_DIR": str(tmp_path / "cache")}


def _run(args: list[str], env: dict[str, str]):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, args, env=env)
    return result


def _findings(tmp_path: Path) -> dict[str, tuple[int, str | None]]:
    db = sqlite3.connect(tmp_path / "data" / "auditor.db")
    try:
        rows = db.execute("select related_repo, suppressed, suppressed_reason from findings "
                          "where rule_id = 'AUD101'").fetchall()
    finally:
        db.close()
    return {r[0]: (int(r[1]), r[2]) for r in rows}


def _model_page(site: Path) -> str:
    pages = [p for p in (site / "models").glob("*.html") if "tiny-blend" in p.name]
    assert len(pages) == 1
    return pages[0].read_text()


def test_authorize_then_reevaluate_suppresses_and_keeps(env: dict[str, str],
                                                        tmp_path: Path) -> None:
    audit = ["audit", BLEND, "--against", "bob/tiny-kv", "--against", "carol/tiny-animals",
             "--store", "-q", "--output", str(tmp_path / "r.json")]
    assert _run(audit, env).exit_code == ExitCode.FINDINGS
    before = _findings(tmp_path)
    assert set(before) == {"bob/tiny-kv", "carol/tiny-animals"}
    assert all(s == 0 for s, _ in before.values())

    granted = _run(["authorize", "carol", BLEND, "--note", "we collaborate",
                    "--no-reevaluate"], env)
    assert granted.exit_code == 0, granted.output
    grant_id = int(re.search(r"authorization (\d+)", granted.output).group(1))  # type: ignore[union-attr]
    # Stored, not yet applied: the stored finding is unchanged until re-evaluation.
    assert _findings(tmp_path)["carol/tiny-animals"][0] == 0

    r = _run(["reevaluate"], env)
    assert r.exit_code == 0, r.output
    assert "1 changed" in r.output
    after = _findings(tmp_path)
    assert set(after) == set(before)  # kept, never dropped
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    suppressed, reason = after["carol/tiny-animals"]
    assert suppressed == 1
    assert reason is not None and reason.startswith(f"authorized by carol on {today}")
    assert "we collaborate" in reason
    assert after["bob/tiny-kv"][0] == 0  # bob gave no permission

    site = tmp_path / "site"
    assert _run(["report", "build", "--output", str(site)], env).exit_code == 0
    page = _model_page(site)
    assert f"authorized by carol on {today}" in page
    assert 'id="authorized"' in page

    # A new audit applies the grant as it is saved (and an on-demand one as it runs).
    r = _run([*audit[:-2], "--output", str(tmp_path / "r2.json"), "--format", "json"], env)
    assert r.exit_code == ExitCode.FINDINGS, r.output  # bob's finding is still active
    assert _findings(tmp_path)["carol/tiny-animals"][0] == 1
    assert "authorized by carol" in (tmp_path / "r2.json").read_text()

    # Withdrawing the grant re-evaluates at once: the finding is active again.
    r = _run(["unauthorize", str(grant_id)], env)
    assert r.exit_code == 0, r.output
    assert _findings(tmp_path)["carol/tiny-animals"] == (0, None)
    assert _run(["report", "build", "--output", str(site)], env).exit_code == 0
    assert f"authorized by carol on {today}" not in _model_page(site)
