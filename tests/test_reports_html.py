"""HTML pages, SVG charts and the static site: escaping, CSP, slugs, links, content."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from auditor.reports import charts
from auditor.reports.formatters import render
from auditor.reports.html import CSP, environment
from auditor.reports.site import SiteData, build_site, slugify
from auditor_testkit.reports import samples

CSP_META = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'.replace("'", "&#39;")


class _Tags(HTMLParser):
    """Collects tags and attributes as a browser's tokenizer would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


def _assert_inert(html: str) -> None:
    for payload in samples.PAYLOADS:
        assert payload not in html
    tags = _tags(html)
    names = {t for t, _ in tags}
    assert "script" not in names and "img" not in names and "iframe" not in names
    for _tag, attrs in tags:
        assert not any(k.startswith("on") for k in attrs), attrs
        for key in ("href", "src", "action"):
            value = attrs.get(key) or ""
            assert not value.lower().startswith(("javascript:", "data:", "//")), value


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("site")
    return out, build_site(out, samples.sample_site_data(), rules=samples.RULES)


def test_environment_autoescapes_every_template() -> None:
    env = environment()
    # A plain True (not a select_autoescape function) applies to every template name.
    assert env.autoescape is True
    assert set(env.list_templates(extensions=["j2"])) >= {
        "layout.j2", "model.j2", "index.j2", "base_family.j2", "owner.j2"}
    out = env.from_string("{{ x }}").render(x="<script>")
    assert out == "&lt;script&gt;"


@pytest.mark.parametrize("report", samples.sample_reports(), ids=lambda r: r.subject.repo_id[:20])
def test_single_report_page_is_escaped_and_locked_down(report: samples.AuditReport) -> None:
    html = render(report, fmt="html", rules=samples.RULES)
    assert html.startswith("<!doctype html>")
    assert CSP_META in html
    assert html.index(CSP_META) < html.index("<style>")
    _assert_inert(html)
    assert "<a " not in html.split("</header>")[0]  # standalone page: no site navigation


def test_payloads_are_shown_as_text() -> None:
    html = render(samples.backdoor_report(), fmt="html", rules=samples.RULES)
    assert "&lt;script&gt;window.__pwned=1;alert(1)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=&#34;window.__pwned=1;alert(1)&#34;&gt;" in html
    # A javascript: reference is shown as text, never linked; the https one is linked.
    assert 'href="javascript:' not in html
    assert '<span class="mono">javascript:alert(1)</span>' in html
    assert '<a href="https://example.org/backdoors"' in html


def test_model_page_content() -> None:
    html = render(samples.merge_report(), fmt="html", rules=samples.RULES)
    verdict = html.index("Undeclared merge of bob/math-ft (high)")
    assert verdict < html.index('id="findings"')
    assert 'class="chart chart-coefficients"' in html
    assert html.count('class="bar"') == 16  # 8 layers x 2 parents
    assert 'class="chart chart-heatmap"' in html
    assert 'class="chart chart-barrier"' in html
    assert html.count('class="series"') == 3
    assert "Authorized findings" in html and "owner authorized merges by mallory" in html
    assert "Declare every parent" in html  # remediation from the rule
    clean = render(samples.finetune_report(), fmt="html")
    assert ">Clean<" in clean
    assert 'class="chart chart-scale"' in clean


def test_charts_escape_labels_and_reject_non_finite_numbers() -> None:
    svg = charts.coefficient_bars({"<b>p</b>": {"l<1>": float("nan"), "l2": 0.5}})
    assert "<b>" not in svg and "&lt;b&gt;p&lt;/b&gt;" in svg
    assert "nan" not in svg.lower() and "inf" not in svg.lower()
    line = charts.line_chart([charts.Series('"x"', [0, 0.5, 1], [1.0, float("inf"), 2.0])],
                             title="<t>", x_label="a", y_label="b")
    assert "inf" not in line and "&lt;t&gt;" in line and line.count("<circle") == 2
    empty = charts.similarity_heatmap({})
    assert "No per-layer similarities" in empty
    assert charts.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_lineage_graph_styles() -> None:
    nodes = [charts.GraphNode("b", "b", kind="base"), charts.GraphNode("f", "f"),
             charts.GraphNode("m", "m", href="models/m.html", kind="merge")]
    edges = [charts.GraphEdge("b", "f", declared=True),
             charts.GraphEdge("f", "m", declared=True, detected=True),
             charts.GraphEdge("b", "m", detected=True)]
    svg = charts.lineage_graph(nodes, edges)
    assert svg.count('class="edge edge-declared"') == 2
    assert svg.count('class="edge edge-undeclared"') == 1
    assert 'stroke-dasharray="6 4"' in svg and '<a href="models/m.html">' in svg
    # Layered: base left of the fine-tune, fine-tune left of the merge.
    xs = {m.group(2): float(m.group(1)) for m in re.finditer(
        r'<rect class="node[^"]*" x="([\d.]+)".*?<title>(\w)</title>', svg)}
    assert xs["b"] < xs["f"] < xs["m"]


@pytest.mark.parametrize("repo_id", [
    "../../etc/passwd", "..", "/abs/path", "a/b", "a-b", "<script>x</script>", "", "a" * 300,
    "C:\\windows\\x", "ok/name.with.dots",
])
def test_slugs_are_safe(repo_id: str) -> None:
    slug = slugify(repo_id)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", slug)
    assert not slug.startswith(".") and ".." not in slug.split("-")[0][:2]
    assert len(slug) <= 100
    assert slugify("a/b") != slugify("a-b")


def test_site_pages_and_links(site: tuple[Path, list[Path]]) -> None:
    out, written = site
    root = out.resolve()
    assert all(p.resolve().is_relative_to(root) for p in written)
    rel = sorted(str(p.relative_to(root)) for p in written)
    assert "index.html" in rel
    assert sum(r.startswith("models/") and r.endswith(".html") for r in rel) == 5
    assert sum(r.startswith("bases/") for r in rel) == 2
    assert {r.split("/")[0] for r in rel} == {"index.html", "models", "bases", "owners", "feeds"}
    html_files = [p for p in written if p.suffix == ".html"]
    for page in html_files:
        html = page.read_text(encoding="utf-8")
        assert CSP_META in html
        _assert_inert(html)
        for tag, attrs in _tags(html):
            href = attrs.get("href")
            if tag == "a" and href and not href.startswith("https://"):
                assert "://" not in href and not href.startswith("/"), href
                target = (page.parent / href.split("#")[0]).resolve()
                assert target.is_file(), f"{page.name}: broken link {href}"
            assert attrs.get("src") is None


def test_site_content(site: tuple[Path, list[Path]]) -> None:
    out, _ = site
    index = (out / "index.html").read_text(encoding="utf-8")
    counts = re.findall(r'<div class="n">(\d+)</div><div class="l">(\w+)</div>', index)
    assert {label: int(n) for n, label in counts} == {
        "critical": 2, "high": 1, "medium": 0, "low": 1, "info": 0}
    assert index.index("Backdoor trigger") < index.index("Pickle file present")
    base = (out / "bases" / f"{slugify(samples.BASE)}.html").read_text(encoding="utf-8")
    assert 'class="chart chart-lineage"' in base
    assert "edge-undeclared" in base and "declared, not detected" not in base.split("<svg")[0]
    assert ">not audited<" in base  # bob/math-ft is watched but has no audit
    owner_bob = (out / "owners" / f"{slugify('bob')}.html").read_text(encoding="utf-8")
    derived = owner_bob.split('id="derived"')[1].split("</section>")[0]
    assert "mallory/super-merge-7b" in derived and ">undeclared<" in derived
    owner_acme = (out / "owners" / f"{slugify('acme')}.html").read_text(encoding="utf-8")
    protection = owner_acme.split('id="protection"')[1].split("</section>")[0]
    assert "Not protected: it can be merged without loss" in protection
    derived = owner_acme.split('id="derived"')[1].split("</section>")[0]
    assert "evil-clone/base-7b-copy" in derived
    owner_alice = (out / "owners" / f"{slugify('alice')}.html").read_text(encoding="utf-8")
    assert "Protected: merging it breaks the merged model" in owner_alice


def test_empty_site_builds(tmp_path: Path) -> None:
    written = build_site(tmp_path, SiteData())
    assert [p.name for p in written] == ["index.html"]
    assert "No base models are watched yet." in written[0].read_text(encoding="utf-8")


def test_site_data_from_store(store_session) -> None:  # type: ignore[no-untyped-def]
    from auditor.reports.from_store import site_data_from_store
    from auditor.store import catalog, policy, queue

    policy.watch_add(store_session, repo_id=samples.BASE)
    for report in (samples.base_report(), samples.merge_report()):
        s = report.subject
        catalog.upsert_repo(store_session, repo_id=s.repo_id, owner=s.owner,
                               declared_base_models=s.declared_base_models)
        rev = catalog.upsert_revision(store_session, repo_id=s.repo_id, sha=s.revision)
        audit_id = queue.queue_audit(store_session, revision_id=rev.id, analysis_version="1",
                                          config_hash="c")
        assert audit_id is not None
        queue.complete_audit(store_session, audit_id=audit_id, report=report)
    catalog.upsert_repo(store_session, repo_id=samples.FINETUNE, owner="alice",
                           declared_base_models=[samples.BASE])
    data = site_data_from_store(store_session)
    assert [b.repo_id for b in data.bases] == [samples.BASE]
    assert data.bases[0].derivatives == [samples.FINETUNE]
    assert {a.subject.repo_id for a in data.audits} == {samples.BASE, samples.MERGE}
    assert {m.repo_id: m.owner for m in data.repos}[samples.MERGE] == "mallory"
    assert data.audits[0].model_dump() in (samples.base_report().model_dump(),
                                           samples.merge_report().model_dump())
