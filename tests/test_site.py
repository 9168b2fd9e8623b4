"""The built site in a real headless Chromium, as a person would use it.

Builds the site with ``mkdocs build --strict``, serves it on 127.0.0.1 and
drives Debian's Chromium with Playwright. Screenshots go to
``artifacts/screenshots/``. Without Chromium the tests skip, except under CI
(``CI`` set), where a missing browser is a failure.

The main site is built as published from ``REPOSITORY`` (``ATC_REPOSITORY``, see
``tools/site/hooks.py``); the hostile-input site as an unpublished one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tools import paths
from tools.loader import load_catalog
from tools.site import reference_pages
from tools.site.feed import LIMIT as FEED_LIMIT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = paths.ROOT / "artifacts" / "screenshots"
REPOSITORY = "https://github.com/example-org/awesome-token-compress"
SITE_URL = "https://example-org.github.io/awesome-token-compress/"
DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
HOSTILE = {
    "title": "[CLS] *Bold* _under_ a<b & c | d",
    "summary": "Keeps *stars*, _underscores_, [CLS] brackets, a<b and &amp; as plain text.",
    "seed": '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
    "[click](https://evil.example/)",
}

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail(f"Chromium not found at {CHROMIUM}; `python dev.py test` installs it")
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


def build_site(target: Path, catalog_dir: Path | None = None, repository: str = "") -> None:
    env = {**os.environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}
    env.pop("SITE_URL", None)
    env["ATC_REPOSITORY"] = repository
    if catalog_dir:
        env["ATC_CATALOG"] = str(catalog_dir)
        env["ATC_REFERENCE"] = str(catalog_dir / "no-modules")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(target)]
    result = subprocess.run(command, cwd=paths.ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


class Server:
    def __init__(self, directory: Path):
        handler = functools.partial(QuietHandler, directory=str(directory))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class Browser:
    """One Chromium; every page records console errors and off-host requests."""

    def __init__(self):
        self._pw = sync_api.sync_playwright().start()
        self.browser = self._pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        self.errors: list[str] = []
        self.external: list[str] = []

    def page(self, viewport: dict | None = None, **options):
        context = self.browser.new_context(viewport=viewport or DESKTOP, **options)

        def route(route):
            if urlsplit(route.request.url).hostname == "127.0.0.1":
                route.continue_()
            else:
                self.external.append(route.request.url)
                route.abort()

        context.route("**/*", route)
        page = context.new_page()
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        return page

    def close(self) -> None:
        self.browser.close()
        self._pw.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build_site(target, repository=REPOSITORY)
    server = Server(target)
    yield server.url, target
    server.close()


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


@pytest.fixture
def page(browser):
    p = browser.page()
    yield p
    p.context.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False)


def visible_ids(page) -> list[str]:
    return page.eval_on_selector_all(
        "#atc-papers tbody tr:not([hidden])", "rows => rows.map(r => r.dataset.id)"
    )


def search(page, query: str):
    """Type ``query`` into the search box as a person would; the result links."""
    toggle = page.locator("label.md-header__button[for=__search]")  # a phone's search icon
    if toggle.is_visible():
        toggle.click()
    else:
        page.click(".md-search__input")
    sync_api.expect(page.locator(".md-search__input")).to_be_focused()
    page.keyboard.type(query)
    return page.locator(".md-search-result__item > a")


def test_search_for_token_merging_lists_tome(site, page):
    """Material's search ORs the words, so with 140 papers "token" alone fills the first
    screen; ToMe's page must still be among the results a reader scrolls through."""
    url, _ = site
    page.goto(url + "/")
    search(page, "token merging")
    # Results follow the typing: wait for those of the whole query (both words highlighted).
    page.locator(".md-search-result__item a[href*='h=token+merging']").first.wait_for(
        timeout=10_000
    )
    found = page.locator(".md-search-result__item a[href*='papers/tome/']")
    for _ in range(20):  # the result list renders more items as it is scrolled
        if found.count():
            break
        page.locator(".md-search-result__item").last.scroll_into_view_if_needed()
        page.wait_for_timeout(200)
    shot(page, "search-token-merging")
    hrefs = page.eval_on_selector_all(
        ".md-search-result__item a", "links => links.map(a => a.getAttribute('href'))"
    )
    assert any(urlsplit(h).path.rstrip("/").endswith("papers/tome") for h in hrefs), hrefs


@pytest.mark.parametrize(
    ("query", "paper_id"),
    [
        ("FastV", "fastv"),
        ("ToMe", "tome"),
        ("LLaVA-PruMerge", "llava_prumerge"),
        ("Vote&Mix", "vote_and_mix"),
    ],
)
def test_search_for_a_short_name_shows_its_paper_first(site, page, query, paper_id):
    """As the list writes it; FastV is also the start of FastVLM."""
    url, _ = site
    page.goto(url + "/")
    results = search(page, query)
    sync_api.expect(results.first).to_have_attribute(
        "href", re.compile(rf"/papers/{paper_id}/(\?|$)"), timeout=10_000
    )
    if query == "FastV":
        shot(page, "search-fastv")


def test_search_on_a_phone_shows_the_paper_first(site, browser):
    url, _ = site
    page = browser.page(PHONE, is_mobile=True, has_touch=True)
    page.goto(url + "/papers/")
    results = search(page, "FastV")
    sync_api.expect(results.first).to_have_attribute(
        "href", re.compile(r"/papers/fastv/(\?|$)"), timeout=10_000
    )
    shot(page, "search-fastv-phone")
    page.context.close()


def test_search_index_holds_papers_not_reference_source(site):
    """The reference pages' source is code, not prose: kept out of the index."""
    _, root = site
    raw = (root / "search" / "search_index.json").read_text(encoding="utf-8")
    docs = json.loads(raw)["docs"]
    text = "\n".join(d["title"] + "\n" + d["text"] for d in docs)
    modules = reference_pages.read_modules(paths.REFERENCE)
    assert modules
    sources = 0
    for module in modules:
        sources += len(module.source)
        for line in re.findall(r"^(?:def|class) \w+\(", module.source, re.M):
            assert line not in text, (module.name, line)
        assert "import torch" not in text
    reference = sum(len(json.dumps(d)) for d in docs if d["location"].startswith("reference/"))
    # With the source it was 1.35 times the sources (HTML-escaped code): 418 of 623 KB.
    assert reference < 0.6 * sources
    assert not [d for d in docs if d["location"].startswith("SUMMARY")]


def test_filter_index_to_video_shows_exactly_the_video_papers(site, page):
    url, _ = site
    page.goto(url + "/papers/")
    every = visible_ids(page)
    catalog = load_catalog()
    assert sorted(every) == sorted(p.id for p in catalog.papers)
    page.select_option("#atc-filter-modality", "video")
    video = {p.id for p in catalog.papers if "video" in p.modality}
    shot(page, "index-video")
    assert set(visible_ids(page)) == video and len(visible_ids(page)) == len(video)
    assert page.inner_text("#atc-count") == f"{len(video)} of {len(every)} papers"
    page.select_option("#atc-filter-modality", "")
    page.fill("#atc-filter-text", "merging")
    assert "tome" in visible_ids(page) and "fastv" not in visible_ids(page)


def test_sort_index_by_year(site, page):
    url, _ = site
    page.goto(url + "/papers/")
    released = "rows => rows.map(r => r.dataset.released)"
    selector = "#atc-papers tbody tr"
    page.click("#atc-papers th[data-key=year]")
    ascending = page.eval_on_selector_all(selector, released)
    assert ascending == sorted(ascending) and ascending[0] < ascending[-1]
    page.click("#atc-papers th[data-key=year]")
    descending = page.eval_on_selector_all(selector, released)
    shot(page, "index-sorted-year-desc")
    assert descending == sorted(descending, reverse=True)
    assert page.get_attribute("#atc-papers th[data-key=year]", "aria-sort") == "descending"


def test_paper_page_shows_bibtex_and_code_link(site, page):
    url, _ = site
    tome = next(p for p in load_catalog().papers if p.id == "tome")
    page.goto(url + "/papers/tome/")
    shot(page, "paper-tome")
    assert page.inner_text("h1").startswith("ToMe: Token Merging")
    code = page.locator(".highlight", has_text="@inproceedings{tome,").inner_text()
    assert "Bolya" in code and "booktitle = {ICLR 2023}" in code
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.locator(".highlight", has_text="@inproceedings{tome,").hover()
    page.click("button.md-code__button[data-md-type=copy]")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith("@inproceedings{tome,")
    assert page.get_attribute("a.atc-code", "href") == tome.links.code
    edit = page.get_attribute("a.atc-edit", "href")
    assert edit == f"{REPOSITORY}/edit/main/catalog/papers/tome.yaml"


def test_paper_page_on_a_phone_keeps_field_names_whole(site, browser):
    """Errata field names ("title", "links.code") never break inside the word."""
    url, _ = site
    page = browser.page(PHONE, is_mobile=True, has_touch=True)
    page.goto(url + "/papers/fastv/")
    fields = page.locator(".atc-errata .atc-field code")
    assert fields.count() >= 1
    lines = fields.evaluate_all("codes => codes.map(c => c.getClientRects().length)")
    page.locator(".atc-errata").scroll_into_view_if_needed()
    shot(page, "paper-fastv-phone-errata")
    page.goto(url + "/papers/fastv/")
    shot(page, "paper-fastv-phone")
    page.context.close()
    assert lines == [1] * len(lines)


def test_publishing_settings_reach_canonical_links_sitemap_and_feed(site):
    _, root = site
    home = (root / "index.html").read_text(encoding="utf-8")
    assert f'<link rel="canonical" href="{SITE_URL}">' in home
    assert "127.0.0.1" not in home
    sitemap = ET.parse(root / "sitemap.xml").getroot()
    locs = [loc.text for loc in sitemap.iter("{http://www.sitemaps.org/schemas/sitemap/0.9}loc")]
    assert f"{SITE_URL}papers/tome/" in locs and all(loc.startswith(SITE_URL) for loc in locs)
    assert "api.github.com" not in home  # no repo_url: nothing fetched from GitHub
    # literate-nav's navigation file is not a page.
    assert not (root / "SUMMARY").exists()
    assert not [loc for loc in locs if "SUMMARY" in loc]


def test_every_page_loads_without_console_errors_or_outside_requests(site, browser):
    url, root = site
    page = browser.page()
    pages = sorted(p.parent.relative_to(root) for p in root.rglob("index.html"))
    assert len(pages) >= 65 + 5
    for index, path in enumerate(pages):
        # Wait for the network to settle on the first page (the search index
        # loads in a worker after the page); "load" is enough for the rest.
        page.goto(
            f"{url}/{path.as_posix()}/".replace("/./", "/"),
            wait_until="networkidle" if index == 0 else "load",
        )
    shot(page, "last-page")
    page.context.close()
    assert browser.errors == []
    assert browser.external == []


def test_atom_feed(site):
    _, root = site
    feed = ET.parse(root / "feed.xml").getroot()
    ns = {"a": "http://www.w3.org/2005/Atom"}
    entries = feed.findall("a:entry", ns)
    papers = load_catalog().papers
    assert len(entries) == min(FEED_LIMIT, len(papers))  # the newest additions
    first = entries[0]
    assert first.find("a:id", ns).text.startswith("urn:awesome-token-compress:paper:")
    link = first.find("a:link[@rel='alternate']", ns).get("href")
    assert link.startswith(f"{SITE_URL}papers/")
    path = urlsplit(link).path.removeprefix(urlsplit(SITE_URL).path)
    assert (root / path / "index.html").is_file()
    titles = [e.find("a:title", ns).text for e in entries]
    newest = max(papers, key=lambda p: (p.added, p.released, p.id))
    assert titles[0] == newest.display_title


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory):
    """A site built from a catalog whose strings carry HTML and Markdown syntax."""
    catalog = tmp_path_factory.mktemp("catalog")
    (catalog / "papers").mkdir()
    shutil.copy(paths.CATALOG / "taxonomy.yaml", catalog / "taxonomy.yaml")
    (catalog / "no-modules").mkdir()

    def unlinked(paper_id: str) -> str:
        text = (paths.CATALOG / "papers" / f"{paper_id}.yaml").read_text(encoding="utf-8")
        return re.sub(r"(?m)^reference: .*$", "reference: null", text)

    for paper_id in ("evit", "fastv"):
        (catalog / "papers" / f"{paper_id}.yaml").write_text(unlinked(paper_id), encoding="utf-8")
    text = unlinked("tome")
    text = text.replace(
        'title: "Token Merging: Your ViT But Faster"', f'title: "{HOSTILE["title"]}"'
    )
    start = text.index("summary: >-")
    end = text.index("added:")
    text = text[:start] + f'summary: "{HOSTILE["summary"]}"\n' + text[end:]
    text = text.replace(
        "errata:\n",
        f"errata:\n  - field: title\n    seed: '{HOSTILE['seed']}'\n"
        "    note: A crafted erratum whose seed text is hostile markup.\n",
        1,
    )
    (catalog / "papers" / "tome.yaml").write_text(text, encoding="utf-8")
    target = tmp_path_factory.mktemp("hostile-site")
    build_site(target, catalog)
    server = Server(target)
    yield server.url
    server.close()


def test_unpublished_site_links_to_its_own_copies(hostile_site, browser):
    """Without ATC_REPOSITORY: "Edit this page" opens the shipped YAML, the feed is relative."""
    page = browser.page()
    page.goto(hostile_site + "/papers/evit/")
    edit = page.get_attribute("a.atc-edit", "href")
    assert edit == "../../catalog/papers/evit.yaml"
    assert "\nid: evit\n" in page.request.get(hostile_site + "/papers/evit/" + edit).text()
    assert page.locator("link[rel=canonical]").count() == 0
    feed = ET.fromstring(page.request.get(hostile_site + "/feed.xml").body())
    hrefs = [link.get("href") for link in feed.iter("{http://www.w3.org/2005/Atom}link")]
    assert "papers/evit/" in hrefs and "feed.xml" in hrefs
    page.context.close()


@pytest.mark.parametrize("path", ["/", "/papers/", "/papers/tome/", "/taxonomy/"])
def test_markup_in_catalog_strings_shows_as_text(hostile_site, browser, path):
    page = browser.page()
    page.goto(hostile_site + path)
    page.wait_for_load_state("networkidle")
    shot(page, "hostile" + path.replace("/", "_"))
    assert page.evaluate("window.__pwned") is None
    assert page.locator("a[href*='evil.example']").count() == 0
    assert page.locator("b").count() == 0  # "a<b" in the title opened no element
    body = page.inner_text("body")
    if path != "/taxonomy/":
        assert HOSTILE["title"] in body
    if path == "/papers/tome/":
        assert page.title().startswith("ToMe: " + HOSTILE["title"])
        assert HOSTILE["summary"] in body
        assert "<script>window.__pwned = 1</script>" in body
        assert "[click](https://evil.example/)" in body
    if path == "/taxonomy/":
        assert "ToMe" in body
    page.context.close()
