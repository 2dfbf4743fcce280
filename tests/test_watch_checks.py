"""What the operator passes in is checked: `watch add` refuses a base that does not exist
or is not a model; a crawl of a vanished base fails instead of "ok"; progress lines name
the repo and a total that is never below the count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from auditor.cli import app
from auditor.daemon.progress import AuditCounter, AuditTick, tick_line
from tests.fixtures_hub import make_repo
from tests.test_daemon_support import BASE, make_zoo


def _env(tmp_path: Path, url: str) -> dict[str, str]:
    return {"AUDITOR_DATA_DIR": str(tmp_path / "data"), "AUDITOR_HUB_ENDPOINT": url,
            "AUDITOR_DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}"}


def test_watch_add_checks_the_base_on_the_hub(tmp_path: Path, hub_root: Path,
                                               hub_server: Any) -> None:
    make_zoo(hub_root, derivatives=())
    make_repo(hub_root, "org/just-a-readme", card={"license": "mit"})
    env = _env(tmp_path, hub_server(hub_root).url)
    runner = CliRunner()
    missing = runner.invoke(app, ["watch", "add", "nobody/nothing"], env=env)
    assert missing.exit_code == 2
    assert "nobody/nothing" in missing.output and "no such model" in missing.output
    not_model = runner.invoke(app, ["watch", "add", "org/just-a-readme"], env=env)
    assert not_model.exit_code == 2 and "is it a model" in not_model.output
    assert runner.invoke(app, ["watch", "add", BASE], env=env).exit_code == 0
    listed = runner.invoke(app, ["watch", "list"], env=env).output.split()
    assert listed == [BASE]
    # Offline operators can skip the check.
    assert runner.invoke(app, ["watch", "add", "later/base", "--no-check"],
                         env=env).exit_code == 0


def test_crawl_of_a_missing_base_is_not_ok(tmp_path: Path, hub_root: Path,
                                           hub_server: Any) -> None:
    make_zoo(hub_root, derivatives=())
    env = _env(tmp_path, hub_server(hub_root).url)
    runner = CliRunner()
    assert runner.invoke(app, ["watch", "add", "gone/base", "--no-check"],
                         env=env).exit_code == 0
    result = runner.invoke(app, ["crawl", "--once"], env=env)
    assert result.exit_code == 1
    assert "gone/base: listed 0" in result.output and "FAILED" in result.output
    assert "(ok)" not in result.output


def test_progress_ticks_name_the_repo_and_never_exceed_the_total(store_session) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy.orm import sessionmaker

    from auditor.store import catalog, queue

    factory = sessionmaker(bind=store_session.get_bind(), expire_on_commit=False)
    ids = []
    for i in range(3):
        rev = catalog.upsert_revision(store_session, repo_id=f"o/m{i}", sha=f"{i:040d}")
        ids.append(queue.queue_audit(store_session, revision_id=rev.id,
                                     analysis_version="1", config_hash="c"))
    ticks: list[AuditTick] = []
    counter = AuditCounter(factory, ticks.append)
    from auditor_testkit.reports import samples

    for n, audit_id in enumerate(ids):
        report = samples.finetune_report().model_copy(update={
            "subject": samples.finetune_report().subject.model_copy(
                update={"repo_id": f"o/m{n}"})})
        queue.complete_audit(store_session, audit_id=audit_id, report=report)
        if n == 0:  # a merge re-queued meanwhile grows the total
            rev = catalog.upsert_revision(store_session, repo_id="o/late", sha="9" * 40)
            queue.queue_audit(store_session, revision_id=rev.id, analysis_version="1",
                              config_hash="c")
        counter()
    assert [t.repo_id for t in ticks] == ["o/m0", "o/m1", "o/m2"]
    assert [(t.done, t.total) for t in ticks] == [(1, 4), (2, 4), (3, 4)]
    assert all(t.done <= t.total for t in ticks)
    assert tick_line(ticks[1]) == "audited o/m1 (2/4)"
