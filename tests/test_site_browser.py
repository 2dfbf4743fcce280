"""Open every page of the static site in headless Chromium (system build, over file://)."""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from auditor.reports.site import build_site, slugify
from auditor_testkit.reports import samples

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed at "
                       "/usr/bin/chromium (apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def browser_page() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as user_data:
        context = p.chromium.launch_persistent_context(
            user_data, executable_path=str(CHROMIUM), args=ARGS, headless=True,
            viewport={"width": 1200, "height": 900}, java_script_enabled=True,
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_every_page_loads_clean_and_payloads_stay_inert(browser_page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    page = browser_page
    written = build_site(tmp_path / "site", samples.sample_site_data(), rules=samples.RULES)
    pages = [p for p in written if p.suffix == ".html"]
    assert len(pages) >= 10

    console_errors: list[str] = []
    failed: list[str] = []
    requests: list[str] = []
    dialogs: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("request", lambda r: requests.append(r.url))

    def on_dialog(dialog) -> None:  # type: ignore[no-untyped-def]
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    for html_file in pages:
        requests.clear()
        page.goto(html_file.as_uri(), wait_until="load")
        # Only the page itself is fetched: no stylesheet, font, image or script from anywhere.
        assert requests == [html_file.as_uri()], requests
        assert page.evaluate("typeof window.__pwned") == "undefined", html_file
        assert page.locator("script").count() == 0
        assert page.locator("img").count() == 0
        assert page.locator("h1").count() == 1
    assert console_errors == []
    assert failed == []
    assert dialogs == []

    model = tmp_path / "site" / "models" / f"{slugify(samples.MERGE)}.html"
    page.goto(model.as_uri())
    verdict = page.locator("#verdict")
    assert "Undeclared merge of bob/math-ft (high)" in verdict.inner_text()
    # The verdict is the first thing under the title.
    assert page.evaluate(
        "document.querySelector('main').children[2].id") == "verdict"
    assert page.locator("svg.chart-coefficients rect.bar").count() == 16
    assert page.locator("svg.chart-barrier polyline.series").count() == 3
    assert page.locator("svg.chart-heatmap rect.cell").count() == 24
    box = page.locator("svg.chart-coefficients").bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 200

    shot = page.screenshot(full_page=True)
    width, height = _png_size(shot)
    assert width == 1200 and height > 1500
    assert len(shot) > 50_000  # real content, not a blank page
    (tmp_path / "model.png").write_bytes(shot)

    backdoor = tmp_path / "site" / "models" / f"{slugify(samples.BACKDOOR)}.html"
    page.goto(backdoor.as_uri())
    # The payload is visible as text in the title (proof it was escaped, not parsed).
    assert samples.SCRIPT_PAYLOAD in page.locator("h1").inner_text()
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert dialogs == []


# --- the owner's journey, page by page (screenshots kept under AUDITOR_SCREENSHOT_DIR) ---
INCOMPLETE = "carol/half-done"

_EMPTY_COLUMNS_JS = """
() => {
  const bad = [];
  for (const table of document.querySelectorAll('table:not(.evidence)')) {
    const heads = [...table.querySelectorAll('thead th')].map(th => th.innerText.trim());
    const rows = [...table.querySelectorAll('tbody tr')];
    if (!heads.length || !rows.length) continue;
    heads.forEach((h, i) => {
      const cells = rows.map(r => (r.children[i] ? r.children[i].innerText.trim() : ''));
      if (cells.every(c => c === '' || c === '—')) bad.push(h);
    });
  }
  return bad;
}
"""


def _journey_site(tmp_path: Path) -> Path:
    from auditor.reports.site import SiteData
    from auditor.schema import CheckError, SubjectRef

    data = samples.sample_site_data()
    incomplete = samples.finetune_report().model_copy(update={
        "subject": SubjectRef(repo_id=INCOMPLETE, revision="c0ffee0", owner="carol",
                              base_repo_id=samples.BASE, declared_base_models=[samples.BASE]),
        "errors": [CheckError(
            detector="audit", kind="TransientHubError",
            message="candidate bob/math-ft: Hub unreachable and file not cached")],
        "protection": samples.base_report().protection,
    })
    data = SiteData.model_validate({**data.model_dump(), "audits": [
        *[a.model_dump() for a in data.audits], incomplete.model_dump()]})
    out = tmp_path / "journey"
    build_site(out, data, rules=samples.RULES)
    return out


def test_journey_screenshots_key_texts_and_no_empty_columns(browser_page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import os

    page = browser_page
    site = _journey_site(tmp_path)
    shots = Path(os.environ.get("AUDITOR_SCREENSHOT_DIR") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    pages = {
        "index": (site / "index.html", ["Watched bases", "Latest findings", "Related model"]),
        "base": (site / "bases" / f"{slugify(samples.BASE)}.html",
                 ["Declared vs detected lineage", "merge of 2 parents", "Atom feed"]),
        "owner": (site / "owners" / f"{slugify('bob')}.html",
                  ["Models derived from yours", "What you can do", "auditor authorize bob",
                   "p-value below"]),
        "model-merge": (site / "models" / f"{slugify(samples.MERGE)}.html",
                        ["Undeclared merge of bob/math-ft", "What you can do",
                         "Reading the evidence", "authorized merges by mallory"]),
        "model-backdoor": (site / "models" / f"{slugify(samples.BACKDOOR)}.html",
                           ["Backdoor evidence", "Candidate triggers", samples.SCRIPT_PAYLOAD]),
        "model-clean": (site / "models" / f"{slugify(samples.FINETUNE)}.html",
                        ["Clean", "No active findings"]),
        "model-incomplete": (site / "models" / f"{slugify(INCOMPLETE)}.html",
                             ["Incomplete audit", "Hub unreachable"]),
    }
    for name, (path, texts) in pages.items():
        page.goto(path.as_uri(), wait_until="load")
        # innerText follows CSS (table headers are upper-cased): compare case-blind.
        body = page.locator("body").inner_text().lower()
        for text in texts:
            assert text.lower() in body, (name, text)
        assert page.evaluate(_EMPTY_COLUMNS_JS) == [], name
        assert page.evaluate("typeof window.__pwned") == "undefined"
        shot = page.screenshot(full_page=True)
        assert _png_size(shot)[0] == 1200 and len(shot) > 20_000, name
        (shots / f"{name}.png").write_bytes(shot)
    for name, path in (("feed-owner", site / "feeds" / "owners" / f"{slugify('bob')}.xml"),
                       ("feed-base", site / "feeds" / "bases" / f"{slugify(samples.BASE)}.xml")):
        page.goto(path.as_uri(), wait_until="load")
        text = page.locator("body").inner_text()
        assert "Undeclared merge of bob/math-ft" in text or samples.CLONE in text, name
        assert page.evaluate("typeof window.__pwned") == "undefined"
        (shots / f"{name}.png").write_bytes(page.screenshot(full_page=True))
    assert errors == []
