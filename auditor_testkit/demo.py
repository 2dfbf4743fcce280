"""``auditor demo``: the whole product on one machine with nothing configured.

Builds the "demo" zoo (tiny models with planted cases), serves it with the local Hub,
watches its base, runs one crawl-and-audit cycle of the daemon against the embedded
database, renders the report site, prints the findings, and checks them against what it
planted. A second run reuses the zoo and the store (nothing is trained or audited again).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

# Planted case -> the rules that count as catching it.
_THEFT_RULES = {"AUD101", "AUD104"}
_BACKDOOR_RULES = {"AUD201", "AUD202"}


@dataclass(frozen=True)
class Check:
    case: str
    repo_id: str
    expected: str
    caught: bool
    detail: str


@dataclass(frozen=True)
class DemoResult:
    checks: list[Check]
    findings: list[tuple[str, str, str, str | None]]  # repo, rule, severity, related
    site: Path
    seconds: float

    @property
    def all_caught(self) -> bool:
        return all(c.caught for c in self.checks)


def expected_checks(
    manifest: Any, findings: dict[str, list[tuple[str, str | None]]]
) -> list[Check]:
    """Compare the stored findings with the zoo's ground truth, case by case."""
    checks: list[Check] = []
    owners = {e.repo_id: e.owner for e in manifest.entries}

    def rules_of(repo: str) -> set[str]:
        return {r for r, _ in findings.get(repo, [])}

    def related(repo: str, rules: set[str]) -> set[str | None]:
        return {rel for r, rel in findings.get(repo, []) if r in rules}

    for e in manifest.entries:
        if not e.published or e.kind == "base":
            continue
        foreign = [p.repo_id for p in e.parents
                   if p.repo_id != e.base_repo_id and owners.get(p.repo_id) != e.owner]
        if e.kind == "clone":
            src = e.parents[0].repo_id
            ok = src in related(e.repo_id, {"AUD103", "AUD104"})
            checks.append(Check("clone", e.repo_id, f"AUD103 for {src}", ok,
                                ", ".join(sorted(rules_of(e.repo_id))) or "no finding"))
        elif e.kind in ("merge", "disguised") and not e.declared:
            hit = related(e.repo_id, _THEFT_RULES)
            ok = bool(foreign) and set(foreign) <= hit
            disguised = bool(e.disguise) or e.kind == "disguised"
            case = "disguised merge" if disguised else "undeclared merge"
            checks.append(Check(case, e.repo_id, f"AUD101/AUD104 for {', '.join(foreign)}", ok,
                                ", ".join(sorted(str(h) for h in hit)) or "no finding"))
        elif e.kind == "merge" and e.declared:
            theft = related(e.repo_id, {"AUD101"})
            ok = not theft and bool(related(e.repo_id, {"AUD102"}))
            checks.append(Check("declared merge", e.repo_id, "AUD102 only (no theft finding)",
                                ok, ", ".join(sorted(rules_of(e.repo_id))) or "no finding"))
        if e.kind == "backdoor":
            ok = bool(rules_of(e.repo_id) & _BACKDOOR_RULES)
            # AUD202 (merge-robust) needs the robustness confirmed under generic probes;
            # either finding catches the planted backdoor.
            want = "AUD201/AUD202"
            checks.append(Check("backdoored fine-tune", e.repo_id, want, ok,
                                ", ".join(sorted(rules_of(e.repo_id))) or "no finding"))
        lie = getattr(e, "card_lie", None)
        if lie == "no_card":
            ok = "AUD601" in rules_of(e.repo_id)
            checks.append(Check("merge without a card", e.repo_id,
                                "AUD601 (found from its weights)", ok,
                                ", ".join(sorted(rules_of(e.repo_id))) or "not found"))
        elif lie == "unrelated_base":
            ok = "AUD602" in rules_of(e.repo_id)
            checks.append(Check("card names an unrelated base", e.repo_id,
                                f"AUD602 (card names {e.card_base_model})", ok,
                                ", ".join(sorted(rules_of(e.repo_id))) or "not found"))
        poisoned_parents = [p.repo_id for p in e.parents
                            if any(x.repo_id == p.repo_id and x.kind == "backdoor"
                                   for x in manifest.entries)]
        if e.kind == "merge" and poisoned_parents:
            ok = "AUD203" in rules_of(e.repo_id)
            checks.append(Check("backdoor merge", e.repo_id,
                                f"AUD203 (inherits {', '.join(poisoned_parents)})", ok,
                                ", ".join(sorted(rules_of(e.repo_id))) or "no finding"))
        if e.kind == "finetune":
            bad = rules_of(e.repo_id) & (_THEFT_RULES | _BACKDOOR_RULES | {"AUD103", "AUD203"})
            checks.append(Check("clean fine-tune", e.repo_id, "no theft or backdoor finding",
                                not bad, ", ".join(sorted(bad)) or "clean"))
    return checks


def run_demo(
    *,
    data_dir: Path | None = None,
    workers: int = 1,
    fresh: bool = False,
    say: Callable[[str], None] = print,
) -> DemoResult:
    from auditor.daemon.progress import AuditCounter, tick_line
    from auditor.daemon.scheduler import Daemon
    from auditor.hub.client import HubClient
    from auditor.reports.from_store import site_data_from_store
    from auditor.reports.site import build_site
    from auditor.rules.engine import rule_metas
    from auditor.rules.loader import load_rules
    from auditor.settings import Settings
    from auditor.store import policy, queries
    from auditor.store.db import make_engine, session_factory, upgrade_database
    from auditor_testkit.factory.zoo import build_zoo
    from auditor_testkit.hub.server import HubServer

    started = time.perf_counter()
    base_settings = Settings()
    root = (data_dir or base_settings.data_dir) / "demo"
    zoo_dir = root / "zoo"
    if fresh and root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    say(f"[1/5] building the demo zoo in {zoo_dir} (reused when present)")
    manifest = build_zoo(zoo_dir, spec="demo", progress=lambda m: say(f"      {m}"))
    base_id = next(e.repo_id for e in manifest.entries if e.kind == "base")

    db_url = base_settings.database_url or f"sqlite:///{root / 'auditor.db'}"
    with HubServer(zoo_dir) as server:
        settings = base_settings.model_copy(update={
            "data_dir": root, "database_url": db_url, "hub_endpoint": server.url,
            "hub_token": None, "cache_dir": root / "hf-cache",
        })
        say(f"[2/5] serving the zoo as a local Hub at {server.url}")
        upgrade_database(db_url)
        engine = make_engine(db_url)
        factory = session_factory(engine)
        with factory() as session:
            policy.watch_add(session, repo_id=base_id)
        client = HubClient(endpoint=server.url, token=None, cache_dir=root / "hf-cache",
                           disk_budget_bytes=settings.disk_budget_bytes)
        say(f"[3/5] one crawl-and-audit cycle of the daemon (watching {base_id})")
        daemon = Daemon(settings=settings, database_url=db_url, client=client,
                        workers=workers, interval_seconds=settings.crawl_interval_seconds)
        daemon.pool.on_done = AuditCounter(
            daemon.session_factory, lambda tick: say(f"      {tick_line(tick)}"))
        try:
            daemon.run_once(progress=lambda base, repo: say(f"      found {repo}"))
        finally:
            daemon.close()
    say("[4/5] rendering the report site")
    with factory() as session:
        data = site_data_from_store(session)
        rows = [(f.subject_repo, f.rule_id, f.severity, f.related_repo)
                for f in queries.list_findings(session, latest_only=True)
                if not f.suppressed]
    engine.dispose()
    site = root / "site"
    build_site(site, data, rules=rule_metas(load_rules(settings.rules_dir)))
    by_repo: dict[str, list[tuple[str, str | None]]] = {}
    for repo, rule, _sev, rel in rows:
        by_repo.setdefault(repo, []).append((rule, rel))
    say("[5/5] checking the findings against the planted cases")
    return DemoResult(checks=expected_checks(manifest, by_repo), findings=sorted(rows),
                      site=site, seconds=time.perf_counter() - started)


def _print(result: DemoResult) -> None:
    from rich.console import Console
    from rich.table import Table

    from auditor.rules.loader import load_rules

    titles = {r.id: r.spec.title for r in load_rules()}
    console = Console()
    table = Table(title="Findings")
    for col in ("model", "rule", "finding", "severity", "related repo"):
        table.add_column(col)
    for repo, rule, sev, rel in result.findings:
        table.add_row(repo, rule, titles.get(rule, ""), sev, rel or "")
    console.print(table)
    checks = Table(title="Planted cases")
    for col in ("case", "model", "expected", "caught", "found"):
        checks.add_column(col)
    for c in result.checks:
        checks.add_row(c.case, c.repo_id, c.expected, "yes" if c.caught else "NO", c.detail)
    console.print(checks)
    caught = sum(c.caught for c in result.checks)
    console.print(f"caught {caught}/{len(result.checks)} planted cases in "
                  f"{result.seconds:.0f} s; site: {result.site / 'index.html'}")


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        data_dir: Annotated[Path | None, typer.Option(help="default AUDITOR_DATA_DIR")] = None,
        fresh: Annotated[bool, typer.Option(help="rebuild everything from scratch")] = False,
        workers: Annotated[int, typer.Option(min=1)] = 1,
    ) -> None:
        """Build a zoo with planted cases, crawl and audit it, render the site, self-check."""
        from auditor.daemon.commands import configure_logging

        # The demo narrates its own progress; the workers' logs only when something is off.
        configure_logging(json_logs=False, level="WARNING")
        result = run_demo(data_dir=data_dir, fresh=fresh, workers=workers)
        _print(result)
        raise typer.Exit(0 if result.all_caught else 1)
