"""The static site: index, one page per watched base, audited model and owner.

Pages are plain files with relative links only, so the site works from ``file://``, from
any static host, and offline. File names come from ``slugify``: repo ids are
attacker-controlled, so a name is reduced to ``[A-Za-z0-9._-]`` plus a hash of the full id
(no path traversal, no collisions between ``a/b`` and ``a-b``), and every write is checked
to land inside ``out_dir``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from auditor.reports import charts, json_format, sarif
from auditor.reports import site_facts as facts
from auditor.reports.feeds import FeedEntry, atom_feed
from auditor.reports.html import model_context, render_page
from auditor.reports.summary import severity_counts, sorted_findings, verdict
from auditor.schema import AuditReport, RuleMeta, Severity

# Relative loss barrier up to which a model counts as in its base's basin (a fine-tune).
SAME_BASIN_BARRIER = 0.5
_DETECTED = facts.DETECTED


class Discovered(BaseModel):
    """A derivative found from its weights (provenance ``discovered``), with what its
    card says; ``also`` lists the other ways it was found (declared, family_tree)."""

    model_config = ConfigDict(extra="forbid")

    repo_id: str
    also: list[str] = Field(default_factory=list)
    distance: float | None = None
    card: str = ""


class WatchedBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str
    derivatives: list[str] = Field(default_factory=list)
    discovered: list[Discovered] = Field(default_factory=list)


class RepoMeta(BaseModel):
    """What the Hub says about a repo that the audit report does not carry."""

    model_config = ConfigDict(extra="forbid")

    repo_id: str
    owner: str | None = None
    created_at: datetime | None = None
    declared_bases: list[str] = Field(default_factory=list)


class SiteData(BaseModel):
    """Everything the site shows. ``audits`` are oldest first: a repo's last audit wins."""

    model_config = ConfigDict(extra="forbid")

    bases: list[WatchedBase] = Field(default_factory=list)
    audits: list[AuditReport] = Field(default_factory=list)
    repos: list[RepoMeta] = Field(default_factory=list)
    generated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    # When each repo's shown audit finished (feed entry dates); generated_at if unknown.
    audited_at: dict[str, datetime] = Field(default_factory=dict)
    # Where the "discuss / report on the Hub" links point.
    hub_url: str = "https://huggingface.co"
    # The site's public URL, for absolute links in the Atom feeds (relative if unset).
    site_url: str | None = None


def slugify(repo_id: str) -> str:
    """A safe, unique file-name stem for an attacker-chosen id."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", repo_id).strip(".-_")[:80].strip(".-_")
    digest = hashlib.sha256(repo_id.encode("utf-8")).hexdigest()[:10]
    return f"{clean or 'repo'}-{digest}"


@dataclass
class _Site:
    data: SiteData
    rules: Sequence[RuleMeta]
    out_dir: Path

    def __post_init__(self) -> None:
        self.latest: dict[str, AuditReport] = {}
        for report in self.data.audits:
            self.latest[report.subject.repo_id] = report
        self.meta = {m.repo_id: m for m in self.data.repos}
        self.bases = {b.repo_id: b for b in self.data.bases}
        self.generated = self.data.generated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.written: list[Path] = []

    # --- facts ---------------------------------------------------------------------------------
    def owner_of(self, repo_id: str) -> str | None:
        meta = self.meta.get(repo_id)
        if meta and meta.owner:
            return meta.owner
        report = self.latest.get(repo_id)
        if report and report.subject.owner:
            return report.subject.owner
        return repo_id.split("/", 1)[0] if "/" in repo_id else None

    def declared_bases(self, repo_id: str) -> list[str]:
        meta = self.meta.get(repo_id)
        report = self.latest.get(repo_id)
        found = list(meta.declared_bases) if meta else []
        if report:
            found += [b for b in report.subject.declared_base_models if b not in found]
        return found

    def owners(self) -> list[str]:
        repos: Iterable[str] = [*self.latest, *self.bases,
                                *(d for b in self.data.bases for d in b.derivatives)]
        return sorted({o for r in repos if (o := self.owner_of(r))})

    def family(self, base_id: str) -> list[str]:
        """Derivatives of a base: watched list, plus any audit that declares or detects it."""
        members = list(self.bases[base_id].derivatives) if base_id in self.bases else []
        for repo_id, report in self.latest.items():
            if repo_id == base_id or repo_id in members:
                continue
            detected = any(e.repo_id == base_id and e.relation in _DETECTED
                           for e in report.lineage)
            if detected or base_id in self.declared_bases(repo_id):
                members.append(repo_id)
        return members

    # --- links ---------------------------------------------------------------------------------
    def model_href(self, repo_id: str, root: str) -> str | None:
        if repo_id in self.latest:
            return f"{root}models/{slugify(repo_id)}.html"
        if repo_id in self.bases:
            return f"{root}bases/{slugify(repo_id)}.html"
        return None

    def owner_href(self, owner: str | None, root: str) -> str | None:
        return f"{root}owners/{slugify(owner)}.html" if owner else None

    # --- writing -------------------------------------------------------------------------------
    def write(self, rel: str, text: str) -> Path:
        root = self.out_dir.resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root):  # defence in depth: slugify already prevents it
            raise ValueError(f"refusing to write outside the site: {rel!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.written.append(path)
        return path

    def page(self, rel: str, template: str, **context: Any) -> Path:
        root = "../" * rel.count("/")
        html = render_page(template, root=root, generated_at=self.generated, **context)
        return self.write(rel, html)

    # --- pages ---------------------------------------------------------------------------------
    def model_page(self, report: AuditReport) -> None:
        repo_id = report.subject.repo_id
        slug = slugify(repo_id)
        owner = self.owner_of(repo_id)
        meta = self.meta.get(repo_id)
        self.write(f"models/{slug}.json", json_format.format_report(report, rules=self.rules))
        self.write(f"models/{slug}.sarif", sarif.format_report(report, rules=self.rules))
        context = model_context(
            report, rules=self.rules, link_for=lambda r: self.model_href(r, "../"),
            meta={
                "owner": owner,
                "owner_href": self.owner_href(owner, "../"),
                "created_at": meta.created_at.strftime("%Y-%m-%d") if meta and meta.created_at
                else None,
            },
        )
        context["downloads"] = {"json": f"{slug}.json", "sarif": f"{slug}.sarif"}
        context["hub_url"] = self.data.hub_url
        self.page(f"models/{slug}.html", "model.j2", **context)

    def base_page(self, base_id: str) -> None:
        members = self.family(base_id)
        rows = []
        for repo_id in members:
            report = self.latest.get(repo_id)
            cited = self.declared_bases(repo_id)
            # A merge's card names its parents; naming family members declares the base too.
            declared = base_id in cited or any(p in members for p in cited)
            # The base is the reference the task vector is taken against, so it is not a
            # lineage candidate: a low loss barrier to it shows the weights come from it.
            barrier = facts.barrier_to(report, base_id) if report else None
            shares_basin = barrier is not None and barrier <= SAME_BASIN_BARRIER
            parents = facts.parents_text(report) if report else []
            # Parents found in the weights are family members, so the weights come from
            # the base too.
            detected = report is not None and (bool(parents) or shares_basin)
            if report is None:
                status, label = "info", "not audited"
            elif detected and declared:
                status, label = "declared", "declared"
            elif detected:
                status, label = "undeclared", "undeclared"
            elif declared:
                status, label = "related", "declared, not detected"
            else:
                status, label = "related", "related"
            link = facts.strongest_link(report) if report else None
            rows.append({
                "repo_id": repo_id, "href": self.model_href(repo_id, "../"),
                "owner": self.owner_of(repo_id), "status": status, "label": label,
                "verdict": verdict(report) if report else None,
                "declared_relation": report.subject.declared_relation if report else None,
                "relation": facts.relation_to_base(report, base_id,
                                                   basin_barrier=SAME_BASIN_BARRIER)
                if report else "not audited",
                "parents": [{**p, "href": self.model_href(p["repo_id"], "../")}
                            for p in parents],
                "link": link, "barrier": barrier,
            })
        slug = slugify(base_id)
        self.page(
            f"bases/{slug}.html", "base_family.j2",
            base_id=base_id, owner=self.owner_of(base_id),
            owner_href=self.owner_href(self.owner_of(base_id), "../"),
            base_href=self.model_href(base_id, "../") if base_id in self.latest else None,
            graph=self.family_graph(base_id, members), rows=rows,
            feed_href=f"../feeds/bases/{slug}.xml",
            discovered=self.discovered_rows(base_id),
        )
        self.feed(f"feeds/bases/{slug}.xml", key=f"base:{base_id}",
                  title=f"Findings in the family of {base_id}",
                  subtitle=f"New findings on derivatives of {base_id}",
                  page=f"bases/{slug}.html", repos=members)

    def discovered_rows(self, base_id: str) -> list[dict[str, Any]]:
        base = next((b for b in self.data.bases if b.repo_id == base_id), None)
        return [{"d": d, "href": self.model_href(d.repo_id, "../"),
                 "owner": self.owner_of(d.repo_id), "base_id": base_id,
                 "base_href": f"../bases/{slugify(base_id)}.html",
                 "verdict": verdict(self.latest[d.repo_id]) if d.repo_id in self.latest
                 else None} for d in (base.discovered if base else [])]

    def family_graph(self, base_id: str, members: list[str]) -> Any:
        nodes: dict[str, charts.GraphNode] = {
            base_id: charts.GraphNode(base_id, base_id, self.model_href(base_id, "../"), "base")
        }
        edges: dict[tuple[str, str], charts.GraphEdge] = {}

        def edge(src: str, dst: str) -> charts.GraphEdge:
            if src not in nodes:
                nodes[src] = charts.GraphNode(src, src, self.model_href(src, "../"),
                                              "base" if src in self.bases else "model")
            return edges.setdefault((src, dst), charts.GraphEdge(src, dst))

        for repo_id in members:
            report = self.latest.get(repo_id)
            kind = "model"
            if report:
                if report.merge.is_merge:
                    kind = "merge"
                if any(f.severity.rank >= Severity.HIGH.rank for f in report.active_findings):
                    kind = "flagged"
            nodes.setdefault(repo_id, charts.GraphNode(repo_id, repo_id,
                                                       self.model_href(repo_id, "../"), kind))
            for parent in self.declared_bases(repo_id):
                edge(parent, repo_id).declared = True
            for e in report.lineage if report else []:
                if e.relation in _DETECTED:
                    ge = edge(e.repo_id, repo_id)
                    ge.detected = True
                    ge.declared = ge.declared or e.declared
                    ge.label = e.relation.replace("_", " ")
            if not report and base_id not in self.declared_bases(repo_id):
                # A watched derivative not audited yet: the Hub listed it under this base.
                edge(base_id, repo_id).declared = True
        return charts.lineage_graph(list(nodes.values()), list(edges.values()),
                                    title=f"Family of {base_id}", id_prefix="fam")

    def owner_page(self, owner: str) -> None:
        mine = {r for r in [*self.latest, *self.bases,
                            *(d for b in self.data.bases for d in b.derivatives)]
                if self.owner_of(r) == owner}
        derived = []
        for repo_id, report in self.latest.items():
            if repo_id in mine:
                continue
            for e in report.lineage:
                # Only what the weights show (a parent or a copy), never a mere similarity.
                if e.repo_id in mine and e.relation in _DETECTED:
                    finding = next((f for f in report.findings
                                    if f.related_repo == e.repo_id), None)
                    derived.append({
                        "repo_id": repo_id, "href": self.model_href(repo_id, "../"),
                        "yours": e.repo_id, "yours_href": self.model_href(e.repo_id, "../"),
                        "entry": e, "verdict": verdict(report),
                        "owner": self.owner_of(repo_id),
                        "authorized": finding.suppressed_reason
                        if finding is not None and finding.suppressed else None,
                        "hub_href": self.hub_href(repo_id, "discussions"),
                    })
        protection = []
        for repo_id in sorted(mine):
            report = self.latest.get(repo_id)
            if report is None:
                continue
            p = report.protection
            if p.merge_resistant is True:
                status, text = "clean", "Protected: merging it breaks the merged model"
            elif p.merge_resistant is False:
                status, text = "medium", "Not protected: it can be merged without loss"
            else:
                status, text = "info", "Not measured"
            protection.append({"repo_id": repo_id, "href": self.model_href(repo_id, "../"),
                               "p": p, "status": status, "text": text,
                               "derived": sum(1 for d in derived if d["yours"] == repo_id)})
        slug = slugify(owner)
        self.page(
            f"owners/{slug}.html", "owner.j2", owner=owner,
            repos=[{"repo_id": r, "href": self.model_href(r, "../"),
                    "verdict": verdict(self.latest[r]) if r in self.latest else None}
                   for r in sorted(mine)],
            derived=derived, protection=protection, thresholds=facts.lineage_thresholds(),
            feed_href=f"../feeds/owners/{slug}.xml", hub_url=self.data.hub_url,
            discovered=[row for b in self.data.bases if self.owner_of(b.repo_id) == owner
                        for row in self.discovered_rows(b.repo_id)],
        )
        involved = set(mine) | {d["repo_id"] for d in derived}
        self.feed(f"feeds/owners/{slug}.xml", key=f"owner:{owner}",
                  title=f"Findings about the models of {owner}",
                  subtitle=f"New findings on models of {owner} and on models derived "
                           "from them", page=f"owners/{slug}.html", repos=sorted(involved))

    # --- feeds ---------------------------------------------------------------------------------
    def hub_href(self, repo_id: str, *tail: str) -> str:
        path = "/".join([quote(repo_id, safe="/"), *tail])
        return f"{self.data.hub_url.rstrip('/')}/{path}"

    def feed(self, rel: str, *, key: str, title: str, subtitle: str, page: str,
             repos: Iterable[str]) -> None:
        entries = []
        for repo_id in repos:
            report = self.latest.get(repo_id)
            if report is None:
                continue
            when = self.data.audited_at.get(repo_id, self.data.generated_at)
            for f in report.active_findings:
                related = f" ({f.related_repo})" if f.related_repo else ""
                entries.append(FeedEntry(
                    key=f"{repo_id}@{report.subject.revision}/{f.rule_id}/{f.related_repo}",
                    title=f"[{f.severity.value}] {repo_id}: {f.title}{related}",
                    href=f"models/{slugify(repo_id)}.html", updated=when, summary=f.message,
                    author=self.owner_of(repo_id) or "unknown"))
        self.write(rel, atom_feed(key=key, title=title, subtitle=subtitle, feed_path=rel,
                                  page_path=page, entries=entries,
                                  generated=self.data.generated_at,
                                  site_url=self.data.site_url))

    def index_page(self) -> None:
        reports = list(self.latest.values())
        latest_findings = []
        seen: set[tuple[str, str, str | None]] = set()
        for report in reversed(reports):  # newest audit first
            for f in sorted_findings(report.active_findings):
                row_key = (report.subject.repo_id, f.rule_id, f.related_repo)
                if row_key in seen:  # one row per model, rule and related repo
                    continue
                seen.add(row_key)
                latest_findings.append({"f": f, "repo_id": report.subject.repo_id,
                                        "href": self.model_href(report.subject.repo_id, ""),
                                        "related": f.related_repo,
                                        "related_href": self.model_href(f.related_repo, "")
                                        if f.related_repo else None})
        latest_findings.sort(key=lambda row: -row["f"].severity.rank)
        bases = []
        for base_id in self.bases:
            members = self.family(base_id)
            flagged = sum(1 for m in members if m in self.latest
                          and self.latest[m].active_findings)
            bases.append({"repo_id": base_id, "href": f"bases/{slugify(base_id)}.html",
                          "derivatives": len(members),
                          "audited": sum(1 for m in members if m in self.latest),
                          "flagged": flagged})
        models = [{"repo_id": r.subject.repo_id, "href": self.model_href(r.subject.repo_id, ""),
                   "owner": self.owner_of(r.subject.repo_id), "verdict": verdict(r)}
                  for r in reversed(reports)]
        self.page(
            "index.html", "index.j2", counts=severity_counts(reports), bases=bases,
            findings=latest_findings[:100], models=models,
            owners=[{"name": o, "href": self.owner_href(o, "")} for o in self.owners()],
        )


def build_site(out_dir: Path, data: SiteData, *, rules: Sequence[RuleMeta] = ()) -> list[Path]:
    """Render the whole site into ``out_dir``; returns every file written."""
    site = _Site(data=data, rules=rules, out_dir=Path(out_dir))
    site.out_dir.mkdir(parents=True, exist_ok=True)
    for report in site.latest.values():
        site.model_page(report)
    for base_id in site.bases:
        site.base_page(base_id)
    for owner in site.owners():
        site.owner_page(owner)
    site.index_page()
    return site.written
