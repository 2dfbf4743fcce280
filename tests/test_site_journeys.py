"""What an owner meets on the site: filled base-page columns, only evidenced derivatives
(thresholds shown), "What you can do", readable evidence, a heatmap key for negative
cells, graph edges around the boxes, no duplicate index rows, Atom feeds."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from auditor.reports import charts
from auditor.reports.evidence import evidence_rows, p_text
from auditor.reports.site import SiteData, build_site, slugify
from auditor.schema import CheckError, Finding, LineageEntry, Severity
from auditor_testkit.reports import samples

ATOM = "{http://www.w3.org/2005/Atom}"


class _Cells(HTMLParser):
    """Table cells' text per column header, for the first table under ``section_id``."""

    def __init__(self, section_id: str) -> None:
        super().__init__()
        self.section_id, self.inside, self.depth = section_id, False, 0
        self.headers: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self._in_table = self._done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section" and dict(attrs).get("id") == self.section_id:
            self.inside = True
        if not self.inside or self._done:
            return
        if tag == "table":
            self._in_table = True
        elif tag == "tr" and self._in_table:
            self.rows.append([])
        elif tag in ("td", "th") and self._in_table:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if not self.inside or self._done:
            return
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table" and self._in_table:
            self._done = True

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table(html: str, section_id: str) -> tuple[list[str], list[list[str]]]:
    p = _Cells(section_id)
    p.feed(html)
    assert p.rows, f"no table in #{section_id}"
    return p.rows[0], p.rows[1:]


def weak_data() -> SiteData:
    """The samples plus a model only weakly similar to bob's (cosine 0.09, 'related')."""
    data = samples.sample_site_data()
    weak = samples.finetune_report().model_copy(update={
        "subject": samples.finetune_report().subject.model_copy(
            update={"repo_id": "zed/weakly-similar", "owner": "zed"}),
        "lineage": [LineageEntry(repo_id=samples.MATH, relation="related", cosine=0.09,
                                 p_value=2e-4, z_score=3.5)],
        "protection": samples.base_report().protection,
        "findings": [Finding(rule_id="AUD001", severity=Severity.HIGH, title="dup",
                             message="m", related_repo=samples.MATH)] * 2,
    })
    return data.model_copy(update={"audits": [*data.audits, weak]})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    build_site(out, weak_data(), rules=samples.RULES)
    return out


def _read(site: Path, kind: str, name: str) -> str:
    return (site / kind / f"{slugify(name)}.html").read_text(encoding="utf-8")


def test_base_page_columns_are_filled(site: Path) -> None:
    headers, rows = table(_read(site, "bases", samples.BASE), "derivatives")
    audited = [r for r in rows if "not audited" not in r[2]]
    assert len(audited) >= 4
    for col in ("Detected relation", "Detected parents (coefficient)",
                "Most similar model (cosine)", "Barrier to base"):
        i = headers.index(col)
        assert any(r[i] not in ("", "—") for r in audited), col
    by_repo = {r[0]: dict(zip(headers, r, strict=True)) for r in rows}
    merge = by_repo[samples.MERGE]
    assert merge["Detected relation"].startswith("merge of 2 parents")
    assert "0.52" in merge["Detected parents (coefficient)"]
    assert "0.41" in merge["Detected parents (coefficient)"]
    assert by_repo[samples.CLONE]["Detected relation"] == f"copy of {samples.BASE}"


def test_owner_page_lists_only_evidenced_derivatives_with_thresholds(site: Path) -> None:
    bob = _read(site, "owners", "bob")
    headers, rows = table(bob, "derived")
    assert [r[0] for r in rows] == [samples.MERGE]  # not the 0.09-cosine "related" one
    assert "zed/weakly-similar" not in bob.split('id="derived"')[1].split("</section>")[0]
    assert "p-value below 0.001" in bob and "at least 5%" in bob and "0.99" in bob
    row = dict(zip(headers, rows[0], strict=True))
    assert row["p-value"] == "3e-07" and row["Coefficient"] == "0.41"
    assert f"auditor authorize bob {samples.MERGE}" in row["Act"]
    actions = bob.split('id="actions"')[1].split("</section>")[0]
    for text in ("auditor authorize bob", "Report", "Protect your models", "Atom feed"):
        assert text in actions


def test_finding_page_says_what_to_do_and_evidence_is_readable(site: Path) -> None:
    page = _read(site, "models", samples.MERGE)
    actions = page.split('id="actions"')[1].split("</section>")[0]
    assert f"auditor authorize bob {samples.MERGE}" in actions
    assert "/discussions" in actions
    findings = page.split('id="findings"')[1].split("</section>")[0]
    assert "3e-07" in findings and "Merge coefficient" in findings
    assert "p-value: the chance" in findings  # the legend
    assert not re.search(r"\d\.\d{8,}", page)  # no 16-digit floats anywhere
    assert "per_layer_coefficient" not in page


def test_evidence_rows_round_and_label() -> None:
    entry = LineageEntry(repo_id="a/b", relation="merge_parent", coefficient=6.9e-11,
                         cosine=0.123456789, p_value=0.0, z_score=12.3456,
                         per_layer_coefficient={"l0": 0.1234567, "l1": 0.3})
    rows = {r["label"]: r["value"] for r in evidence_rows(entry.model_dump(mode="json"))}
    assert rows["p-value"] == "< 1e-12" and p_text(0.0) == "< 1e-12"
    assert rows["Merge coefficient"] == "≈ 0"
    assert rows["Cosine similarity of the task vectors"] == "0.123"
    assert rows["z-score"] == "12.35"
    assert rows["Coefficient per layer"] == "2 layers: min 0.123 · mean 0.212 · max 0.3"
    assert rows["Aligned first (permutation / scaling undone)"] == "no"


def test_heatmap_key_covers_negative_values() -> None:
    svg = str(charts.similarity_heatmap({"x/y": {"l0": -0.6, "l1": 0.8}}))
    assert "cosine -1" in svg
    keys = re.findall(r'<rect class="key"[^>]*fill="(#[0-9a-f]{6})"', svg)
    assert keys[0] == charts._heat_color(-1.0) and keys[-1] == charts._heat_color(1.0)
    assert "cosine 0<" in str(charts.similarity_heatmap({"x/y": {"l0": 0.2}}))


def _path_points(d: str) -> list[tuple[float, float]]:
    """Points along an SVG path of M, L and C commands (cubics sampled)."""
    tokens = re.findall(r"[MLC]|-?\d+(?:\.\d+)?", d)
    pts: list[tuple[float, float]] = []
    i, cur = 0, (0.0, 0.0)
    while i < len(tokens):
        cmd = tokens[i]
        i += 1
        if cmd in ("M", "L"):
            cur = (float(tokens[i]), float(tokens[i + 1]))
            i += 2
            pts.append(cur)
        elif cmd == "C":
            c = [float(t) for t in tokens[i:i + 6]]
            i += 6
            p0, p1, p2, p3 = cur, (c[0], c[1]), (c[2], c[3]), (c[4], c[5])
            for k in range(1, 21):
                t = k / 20
                pts.append(tuple(  # type: ignore[arg-type]
                    (1 - t) ** 3 * a + 3 * (1 - t) ** 2 * t * b + 3 * (1 - t) * t * t * c_
                    + t ** 3 * e for a, b, c_, e in zip(p0, p1, p2, p3, strict=True)))
            cur = p3
    return pts


def test_graph_edges_skipping_a_column_go_around_the_boxes() -> None:
    nodes = [charts.GraphNode("b", "base", None, "base"),
             *(charts.GraphNode(f"f{i}", f"ft {i}", None) for i in range(3)),
             charts.GraphNode("m", "merge", None, "merge")]
    edges = [charts.GraphEdge("b", f"f{i}", declared=True) for i in range(3)]
    edges += [charts.GraphEdge("f0", "m", detected=True), charts.GraphEdge("b", "m",
                                                                         declared=True)]
    svg = str(charts.lineage_graph(nodes, edges))
    boxes = [tuple(float(v) for v in m) for m in re.findall(
        r'<rect class="node[^"]*" x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" '
        r'height="([\d.]+)"', svg)]
    assert len(boxes) == 5
    paths = re.findall(r'<path class="edge[^"]*" d="([^"]+)"', svg)
    assert len(paths) == 5
    for d in paths:
        for x, y in _path_points(d):
            for bx, by, bw, bh in boxes:
                inside = bx + 3 < x < bx + bw - 3 and by + 3 < y < by + bh - 3
                assert not inside, (d, (x, y), (bx, by))


def test_index_has_no_duplicate_rows(site: Path) -> None:
    headers, rows = table((site / "index.html").read_text(encoding="utf-8"), "findings")
    assert "Related model" in headers
    assert len(rows) == len({tuple(r) for r in rows})
    assert sum(r[1] == "zed/weakly-similar" for r in rows) == 1


def test_atom_feeds_per_owner_and_base(site: Path) -> None:
    feed = ET.parse(site / "feeds" / "owners" / f"{slugify('bob')}.xml").getroot()
    assert feed.tag == f"{ATOM}feed"
    assert feed.find(f"{ATOM}id") is not None and feed.find(f"{ATOM}updated") is not None
    entries = feed.findall(f"{ATOM}entry")
    titles = [e.findtext(f"{ATOM}title") or "" for e in entries]
    assert any(samples.MERGE in t and samples.MATH in t for t in titles)
    for e in entries:
        href = e.find(f"{ATOM}link").get("href")  # type: ignore[union-attr]
        assert (site / "feeds" / "owners" / href).resolve().is_file()
    ids = [e.findtext(f"{ATOM}id") for e in entries]
    assert len(ids) == len(set(ids))
    base = ET.parse(site / "feeds" / "bases" / f"{slugify(samples.BASE)}.xml").getroot()
    base_titles = [e.findtext(f"{ATOM}title") or "" for e in base.findall(f"{ATOM}entry")]
    assert any(samples.CLONE in t for t in base_titles)
    assert any(samples.SCRIPT_PAYLOAD in t for t in base_titles)  # text, escaped by XML
    raw = (site / "feeds" / "bases" / f"{slugify(samples.BASE)}.xml").read_text()
    assert samples.SCRIPT_PAYLOAD not in raw
    owner_page = _read(site, "owners", "bob")
    assert 'type="application/atom+xml"' in owner_page


def test_absolute_feed_links_with_a_site_url(tmp_path: Path) -> None:
    data = samples.sample_site_data().model_copy(update={"site_url": "https://audits.example"})
    build_site(tmp_path, data, rules=samples.RULES)
    feed = ET.parse(tmp_path / "feeds" / "owners" / f"{slugify('bob')}.xml").getroot()
    links = [link.get("href") for link in feed.iter(f"{ATOM}link")]
    assert links and all(str(h).startswith("https://audits.example/") for h in links)


def test_incomplete_is_never_styled_clean_and_tiny_numbers_read_zero() -> None:
    from auditor.reports.html import _num
    from auditor.reports.summary import verdict

    report = samples.finetune_report().model_copy(update={"errors": [
        CheckError(detector="audit", kind="TransientHubError", message="candidate x: down")]})
    v = verdict(report)
    assert v.text == "Incomplete audit" and v.css == "incomplete"
    assert verdict(samples.finetune_report()).css == "clean"
    assert _num(6.9e-11) == "≈ 0" and _num(0.25) == "0.25"
