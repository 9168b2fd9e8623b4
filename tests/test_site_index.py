"""The papers index (papers/index.html) in Chromium, at 1440x900 and on a 390x844 phone.

One site build for the module (``tests.test_site.build_site``), served on 127.0.0.1.
Screenshots go to ``artifacts/screenshots/index-*.png``. The escaping checks at the
end render the page text from a hostile catalog without a browser.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.test_site import CHROMIUM, Browser, Server, build_site, shot, sync_api
from tools import paths
from tools.bench_catalog import time_index
from tools.loader import load_catalog
from tools.site.index_page import OFFICIAL_BASIS, index_page
from tools.site.reference_pages import read_modules

DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
AXE = paths.ROOT / "node_modules" / "axe-core" / "axe.min.js"
ROWS = "#atc-papers tbody tr"


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build_site(target)
    return target


@pytest.fixture(scope="module")
def site(built):
    server = Server(built)
    yield server.url + "/papers/"
    server.close()


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


@pytest.fixture
def page(browser):
    p = browser.page()
    p.set_viewport_size(DESKTOP)
    yield p
    p.context.close()
    problems = browser.errors + browser.external
    browser.errors.clear()
    browser.external.clear()
    assert problems == []  # console errors, or requests that left 127.0.0.1


def shown(page) -> list[str]:
    return page.eval_on_selector_all(ROWS, "rows => rows.map(r => r.dataset.id)")


def count_text(page) -> str:
    return page.inner_text("#atc-count")


def query(page) -> dict[str, list[str]]:
    return parse_qs(urlsplit(page.url).query)


def of(catalog, n: int) -> str:
    return f"{n} of {len(catalog.papers)} papers"


def provisional_ids(catalog) -> set[str]:
    basis = {m.name: m.basis for m in read_modules(catalog.reference_dir)}
    return {p.id for p in catalog.papers if p.reference and basis[p.reference] != OFFICIAL_BASIS}


def haystack(paper) -> str:
    """What the text box is documented to match, lowercased."""
    fields = [
        paper.name,
        paper.title,
        paper.summary,
        *(paper.authors or []),
        paper.venue_label,
        str(paper.year),
        paper.target,
        *paper.modality,
        *paper.stage,
        *paper.mechanism,
        paper.training or "",
    ]
    return " ".join(fields).lower()


# Layout


def test_every_column_fits_a_1440px_screen(site, page, catalog):
    page.goto(site)
    widths = page.evaluate(
        """() => ({
          page: document.scrollingElement.scrollWidth, viewport: innerWidth,
          table: document.getElementById('atc-papers').scrollWidth,
          tableBox: document.getElementById('atc-papers').clientWidth,
          scrollers: [...document.querySelectorAll('#atc-index *')]
            .filter(e => e.scrollWidth > e.clientWidth + 1
                         && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX))
            .map(e => e.tagName + '.' + e.className),
        })"""
    )
    shot(page, "index-desktop")
    assert widths["page"] <= widths["viewport"], widths
    assert widths["table"] <= widths["tableBox"], widths  # no inner horizontal scroller
    assert widths["scrollers"] == [], widths
    boxes = page.evaluate(
        """() => [...document.querySelectorAll('#atc-papers thead th')].map(th => {
          const r = th.getBoundingClientRect();
          return {text: th.innerText.trim(), left: r.left, right: r.right, width: r.width};
        })"""
    )
    names = [b["text"].split("\n")[0] for b in boxes]
    assert "Code" in names and "Reference" in names, names
    for box in boxes:
        assert box["width"] > 20 and box["left"] >= 0 and box["right"] <= DESKTOP["width"], box
    # And the cells under them: every row's code and reference links are on screen too.
    right = page.eval_on_selector_all(
        f"{ROWS} td.atc-code, {ROWS} td.atc-ref",
        "cells => Math.max(...cells.map(c => c.getBoundingClientRect().right))",
    )
    assert right <= DESKTOP["width"]
    assert len(shown(page)) == len(catalog.papers)


def test_rows_become_cards_on_a_phone(site, page, catalog):
    page.set_viewport_size(PHONE)
    page.goto(site + "?mechanism=merging")
    layout = page.evaluate(
        """() => {
          const row = document.querySelector('#atc-papers tbody tr');
          const box = e => e.getBoundingClientRect();
          const paper = row.querySelector('td.atc-paper'), code = row.querySelector('td.atc-code');
          return {
            page: document.scrollingElement.scrollWidth, viewport: innerWidth,
            row: box(row).width, paper: box(paper).width,
            paperBottom: box(paper).bottom, codeTop: box(code).top,
            rowLeft: box(row).left, rowRight: box(row).right,
            titleClipped: [...document.querySelectorAll('.atc-title')]
              .some(t => t.scrollWidth > t.clientWidth + 1),
            fontPx: parseFloat(getComputedStyle(row.querySelector('.atc-title')).fontSize),
            codeLabel: getComputedStyle(code, '::before').content,
          };
        }"""
    )
    shot(page, "index-phone")
    assert layout["page"] <= layout["viewport"], layout
    assert layout["rowLeft"] >= 0 and layout["rowRight"] <= PHONE["width"], layout
    # A card: the paper spans the row, and Code sits below it with its label.
    assert layout["paper"] >= 0.9 * layout["row"], layout
    assert layout["codeTop"] >= layout["paperBottom"], layout
    assert layout["codeLabel"] == '"Code: "', layout
    assert not layout["titleClipped"] and layout["fontPx"] >= 13, layout
    # The facets fold behind one button; opening it shows every one.
    assert not page.is_visible("#atc-filter-venue")
    page.click("#atc-facets-toggle")
    assert page.get_attribute("#atc-facets-toggle", "aria-expanded") == "true"
    assert page.is_visible("#atc-filter-venue") and page.is_visible("#atc-filter-provisional")
    assert page.inner_text("#atc-facets-toggle").startswith("Filters (1 chosen)")
    assert page.evaluate("document.scrollingElement.scrollWidth <= innerWidth")
    shot(page, "index-phone-filters")
    # Sorting works from the headings, shown as buttons above the cards.
    page.click("#atc-papers th[data-key=year] button")
    released = page.eval_on_selector_all(ROWS, "rows => rows.map(r => r.dataset.released)")
    assert released == sorted(released)


@pytest.mark.parametrize(
    "viewport, scheme", [(DESKTOP, "light"), (DESKTOP, "dark"), (PHONE, "light")]
)
def test_no_accessibility_violations_in_the_index(site, page, viewport, scheme):
    """axe-core over the index's own markup, filters chosen so the chips show too."""
    if not AXE.is_file():
        pytest.skip("axe-core is not installed (npm ci)")
    page.set_viewport_size(viewport)
    page.emulate_media(color_scheme=scheme)  # a fresh context: no palette stored yet
    page.goto(site + "?mechanism=merging&code=1")
    wanted = "slate" if scheme == "dark" else "default"
    page.wait_for_function(f"document.body.dataset.mdColorScheme === '{wanted}'")
    if scheme == "dark":
        shot(page, "index-desktop-dark")
    page.add_script_tag(path=str(AXE))
    result = page.evaluate(
        "async () => (await axe.run('#atc-index')).violations"
        ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).slice(0, 3))"
    )
    assert result == []


def accessibility_roles(url: str) -> dict[str, int]:
    """Roles in Chromium's accessibility tree with a screen reader's full mode forced on."""
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--force-renderer-accessibility"]
        )
        page = chromium.new_page(viewport=DESKTOP)
        page.goto(url)
        cdp = page.context.new_cdp_session(page)
        nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
        chromium.close()
    roles = Counter(n.get("role", {}).get("value") for n in nodes if not n.get("ignored"))
    return dict(roles)


def test_rows_off_screen_stay_in_the_accessibility_tree(site, catalog):
    """Rows off screen skip rendering (content-visibility), not the screen reader."""
    with ThreadPoolExecutor(1) as pool:  # its own Playwright, beside the module's
        roles = pool.submit(accessibility_roles, site).result()
    rows = len(catalog.papers)
    assert roles["row"] == rows + 1  # and the heading row
    assert roles["cell"] == 8 * rows
    in_table = sum(1 + bool(p.links.code) + bool(p.reference) for p in catalog.papers)
    assert roles["link"] >= in_table  # the page's links, the table's included


# Facets


def test_flag_facets(site, page, catalog):
    page.goto(site)
    checks = [
        ("code", {p.id for p in catalog.papers if p.has_code}),
        ("reference", {p.id for p in catalog.papers if p.reference}),
        ("provisional", provisional_ids(catalog)),
    ]
    for key, expected in checks:
        assert 0 < len(expected) < len(catalog.papers), key  # else the check shows nothing
        page.check(f"#atc-filter-{key}")
        assert set(shown(page)) == expected, key
        assert count_text(page) == of(catalog, len(expected))
        page.uncheck(f"#atc-filter-{key}")
    # Code linked but not released does not count as having code.
    unreleased = {p.id for p in catalog.papers if p.links.code and not p.has_code}
    page.check("#atc-filter-code")
    assert not unreleased & set(shown(page))


def test_venue_facet_is_the_series_with_unpublished_last(site, page, catalog):
    page.goto(site)
    values = page.eval_on_selector_all(
        "#atc-filter-venue option", "options => options.map(o => o.value)"
    )[1:]
    series = {p.venue_series for p in catalog.papers}
    assert set(values) == series
    assert "Findings of ACL" in values and "Findings" not in values
    unpublished = [v for v in values if v in ("arXiv", "OpenReview")]
    assert unpublished and values[-len(unpublished) :] == unpublished
    published = values[: -len(unpublished)]
    assert published == sorted(published, key=str.casefold)
    page.select_option("#atc-filter-venue", "Findings of ACL")
    findings = {p.id for p in catalog.papers if p.venue_series == "Findings of ACL"}
    assert findings and set(shown(page)) == findings
    page.select_option("#atc-filter-venue", "arXiv")
    assert set(shown(page)) == {p.id for p in catalog.papers if p.venue_label == "arXiv"}


def test_chosen_filters_show_as_removable_chips(site, page, catalog):
    page.goto(site)
    page.select_option("#atc-filter-mechanism", "merging")
    page.check("#atc-filter-code")
    page.fill("#atc-filter-text", "video")
    chips = page.eval_on_selector_all("#atc-chips .atc-chip", "c => c.map(e => e.innerText)")
    shot(page, "index-chips")
    assert [c.rstrip("×").strip() for c in chips] == [
        "Text: “video”",
        "Mechanism: merging",
        "Has code",
    ]
    both = [p for p in catalog.papers if "merging" in p.mechanism and p.has_code]
    # Removing one chip drops that filter only.
    page.click("#atc-chips .atc-chip[data-key=text]")
    assert page.input_value("#atc-filter-text") == ""
    assert page.evaluate("document.activeElement.className") == "atc-chip"  # the next one
    assert set(shown(page)) == {p.id for p in both}
    page.click("#atc-chips .atc-chip[data-key=mechanism]")
    assert page.input_value("#atc-filter-mechanism") == ""
    assert set(shown(page)) == {p.id for p in catalog.papers if p.has_code}
    assert query(page) == {"code": ["1"]}
    # One chip left: no "Clear all"; with two, "Clear all" clears both.
    assert page.locator("#atc-clear").count() == 0
    page.select_option("#atc-filter-target", "ViT")
    page.click("#atc-clear")
    assert page.evaluate("document.activeElement.id") == "atc-filter-text"
    assert len(shown(page)) == len(catalog.papers)
    assert count_text(page) == f"{len(catalog.papers)} papers"
    assert page.is_hidden("#atc-chips") and not page.is_checked("#atc-filter-code")
    assert urlsplit(page.url).query == ""


# State in the URL


def test_filtered_view_survives_back(site, page, catalog):
    page.goto(site)
    page.select_option("#atc-filter-mechanism", "merging")
    page.click("#atc-papers th[data-key=year]")  # ascending
    page.click("#atc-papers th[data-key=year]")  # descending
    merging = [p for p in catalog.papers if "merging" in p.mechanism]
    assert query(page) == {"mechanism": ["merging"], "sort": ["-year"]}
    first = shown(page)[0]
    page.click(f"{ROWS}[data-id={first}] a.atc-name")
    page.wait_for_url(f"**/papers/{first}/")
    page.go_back()
    page.wait_for_selector("#atc-papers[data-ready]")
    assert count_text(page) == of(catalog, len(merging))
    assert set(shown(page)) == {p.id for p in merging}
    assert page.input_value("#atc-filter-mechanism") == "merging"
    assert page.get_attribute("#atc-papers th[data-key=year]", "aria-sort") == "descending"
    shot(page, "index-after-back")


def test_shared_url_opens_filtered(site, browser, catalog):
    page = browser.page()
    page.set_viewport_size(DESKTOP)
    page.goto(site + "?venue=Findings+of+ACL&text=token&sort=name&unknown=1&year=1999")
    expected = {
        p.id
        for p in catalog.papers
        if p.venue_series == "Findings of ACL" and "token" in haystack(p)
    }
    assert expected and set(shown(page)) == expected
    assert page.input_value("#atc-filter-venue") == "Findings of ACL"
    assert page.input_value("#atc-filter-text") == "token"
    # A value the page does not offer is dropped, from the controls and the URL;
    # parameters the index does not own stay.
    assert page.input_value("#atc-filter-year") == ""
    assert query(page) == {
        "venue": ["Findings of ACL"],
        "text": ["token"],
        "sort": ["name"],
        "unknown": ["1"],
    }
    page.context.close()


def test_history_entries_of_the_page_restore_their_filters(site, page, catalog):
    """popstate: another entry of this page (e.g. one pushed by instant navigation)."""
    page.goto(site)
    page.evaluate("history.pushState(null, '', '?target=ViT&provisional=1')")
    assert len(shown(page)) == len(catalog.papers)  # pushState alone fires nothing
    page.go_back()
    page.go_forward()
    page.wait_for_function("document.getElementById('atc-filter-target').value === 'ViT'")
    expected = {p.id for p in catalog.papers if p.target == "ViT"} & provisional_ids(catalog)
    assert expected and set(shown(page)) == expected
    assert page.is_checked("#atc-filter-provisional")


def test_markup_in_the_url_shows_as_text(site, page):
    page.goto(site + "?text=%3Cimg%20src%3Dx%20onerror%3D%22window.__pwned%3D1%22%3E")
    chip = page.inner_text("#atc-chips .atc-chip[data-key=text]")
    assert '<img src=x onerror="window.__pwned=1">' in chip
    assert page.locator("#atc-index img").count() == 0
    assert page.evaluate("window.__pwned") is None


# Text box


@pytest.mark.parametrize(
    "text",
    ["merging", "MERGING", "FastV", "bolya merging", "token merging video", "Findings", "llm"],
)
def test_text_box_matches_every_documented_field(site, page, catalog, text):
    page.goto(site)
    page.fill("#atc-filter-text", text)
    words = text.lower().split()
    expected = {p.id for p in catalog.papers if all(w in haystack(p) for w in words)}
    assert expected, text
    assert set(shown(page)) == expected
    if text.lower() == "merging":
        assert {p.id for p in catalog.papers if "merging" in p.mechanism} <= expected
        assert len(expected) >= 20
        shot(page, "index-search-merging")
    if text == "bolya merging":  # an author and a mechanism term
        assert "tome" in expected
    assert count_text(page) == of(catalog, len(expected))


# Marks


def test_code_and_reference_cells_say_what_there_is(site, page, catalog):
    """Provisional implementations are marked; an empty repository is not "code"."""
    page.goto(site)
    cells = {
        row[0]: row[1:]
        for row in page.eval_on_selector_all(
            ROWS,
            "rows => rows.map(r => [r.dataset.id,"
            " r.querySelector('td.atc-code').textContent,"
            " r.querySelector('td.atc-ref').textContent])",
        )
    }
    provisional = provisional_ids(catalog)
    assert provisional
    for paper in catalog.papers:
        code, reference = cells[paper.id]
        if paper.id in provisional:
            assert reference == "reference (provisional)", paper.id
        elif paper.reference:
            assert reference == "reference", paper.id
        else:
            assert reference == "none", paper.id
        if paper.has_code:
            assert code == "code", paper.id
        elif paper.links.code:  # linked, but "the code will be released soon"
            assert code == "repository no code yet", paper.id
        else:
            assert code == "none", paper.id


def test_sort_by_venue_puts_unpublished_last(site, page, catalog):
    page.goto(site)
    page.focus("#atc-papers th[data-key=venue] button")  # by keyboard
    page.keyboard.press("Enter")
    venues = page.eval_on_selector_all(ROWS, "rows => rows.map(r => r.dataset.venue)")
    published = [v for v in venues if v not in ("arXiv", "OpenReview")]
    assert venues[: len(published)] == sorted(published, key=str.casefold)
    assert query(page) == {"sort": ["venue"]}


# The benchmark (python -m tools bench-catalog) measures this page


def test_benchmark_measures_the_index(built, catalog):
    # Its own Playwright: in a thread, since this one already runs the module's browser.
    with ThreadPoolExecutor(1) as pool:
        index = pool.submit(time_index, built, 1).result()
    assert index["index_rows"] == len(catalog.papers)
    assert index["chromium"].split(".")[0].isdigit()
    for key in ("dom_content_loaded", "setup", "filter", "search"):
        assert 0 < index[f"index_{key}_ms"] < 60_000, (key, index)
    assert index["index_setup_ms"] < index["index_dom_content_loaded_ms"]


# Escaping (page text, no browser)

HOSTILE = "<script>alert(1)</script>\"' onmouseover=alert(2) a&b"


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_catalog_strings_stay_text_and_attributes_stay_whole(catalog):
    tome = next(e for e in catalog.entries if e.paper.id == "tome")
    paper = tome.paper.model_copy(
        update={
            "name": "N" + HOSTILE,
            "title": "T" + HOSTILE,
            "summary": "S" + HOSTILE,
            "authors": ["A" + HOSTILE],
            "venue": "Findings of " + HOSTILE + " 2025",
        }
    )
    hostile = dataclasses.replace(catalog, entries=(dataclasses.replace(tome, paper=paper),))
    text = index_page(hostile)
    parser = Collect()
    parser.feed(text)
    assert "script" not in [tag for tag, _ in parser.tags]
    assert not [attrs for _, attrs in parser.tags if "onmouseover" in attrs]
    (row,) = [attrs for tag, attrs in parser.tags if tag == "tr" and "data-id" in attrs]
    assert row["data-text"] == f"S{HOSTILE} A{HOSTILE}"
    assert row["data-venue"] == "Findings of " + HOSTILE  # the series, one value
    options = [a.get("value") for t, a in parser.tags if t == "option"]
    assert "Findings of " + HOSTILE in options
    assert "&lt;script&gt;" in text and "<script>" not in text
