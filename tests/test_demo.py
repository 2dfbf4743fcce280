"""The demo end to end: zoo, local Hub, daemon cycle, SQLite, site, self-check."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from auditor_testkit.demo import expected_checks, run_demo


@pytest.fixture(scope="module")
def demo_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The zoo is kept in the pytest cache (training it is the slow part; a temporary
    # folder without the cache plugin); the database and the site are removed so every
    # run audits for real.
    cache = getattr(request.config, "cache", None)
    root = Path(str(cache.mkdir("auditor-demo"))) if cache else tmp_path_factory.mktemp("demo")
    for stale in ("auditor.db", "auditor.db-wal", "auditor.db-shm", "site", "hf-cache"):
        path = root / "demo" / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return root


def test_demo_catches_every_planted_case(demo_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("AUDITOR_DATABASE_URL", raising=False)
    first = run_demo(data_dir=demo_dir, say=lambda _m: None)
    failed = [c for c in first.checks if not c.caught]
    assert not failed, failed
    cases = {c.case for c in first.checks}
    assert {"undeclared merge", "declared merge", "clone", "disguised merge",
            "backdoored fine-tune", "backdoor merge", "clean fine-tune",
            "merge without a card", "card names an unrelated base",
            "same-data sibling"} <= cases
    assert (first.site / "index.html").is_file()
    # The report pages exist for every audited model, and the store holds the findings.
    assert len(list((first.site / "models").glob("*.html"))) >= 10
    rules = {rule for _, rule, _, _ in first.findings}
    assert {"AUD101", "AUD102", "AUD103", "AUD104", "AUD203", "AUD601", "AUD602"} <= rules

    # A second run reuses the zoo and the store: nothing is audited again.
    second = run_demo(data_dir=demo_dir, say=lambda _m: None)
    assert second.findings == first.findings
    assert second.seconds < first.seconds


def test_self_check_notices_a_missed_case(demo_dir: Path) -> None:
    from auditor_testkit.factory.zoo import load_manifest

    manifest = load_manifest(demo_dir / "demo" / "zoo")
    assert manifest is not None
    # With no findings at all, every planted theft and backdoor counts as missed.
    checks = expected_checks(manifest, {})
    missed = {c.case for c in checks if not c.caught}
    assert {"undeclared merge", "clone", "backdoored fine-tune", "backdoor merge",
            "merge without a card", "card names an unrelated base"} <= missed
    assert all(c.caught for c in checks if c.case == "clean fine-tune")
    assert all(c.caught for c in checks if c.case == "same-data sibling")
    # A sibling accused of a merge of its same-data sibling is a failed check.
    accused = expected_checks(manifest, {"frank/kv-sibling": [("AUD101", "bob/kv-ft")]})
    assert not next(c for c in accused if c.repo_id == "frank/kv-sibling").caught
