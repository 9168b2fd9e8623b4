"""The built site in a real headless Chromium, as a person would use it.

Builds the site with ``mkdocs build --strict``, serves it on 127.0.0.1 and
drives Debian's Chromium with Playwright. Screenshots go to
``artifacts/screenshots/``. Without Chromium the tests skip, except under CI
(``CI`` set), where a missing browser is a failure.
"""

from __future__ import annotations

import functools
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

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = paths.ROOT / "artifacts" / "screenshots"
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


def build_site(target: Path, catalog_dir: Path | None = None) -> None:
    env = {**os.environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}
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

    def page(self):
        context = self.browser.new_context(viewport={"width": 1400, "height": 1000})

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
    build_site(target)
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


def test_search_for_token_merging_lists_tome(site, page):
    url, _ = site
    page.goto(url + "/")
    page.click(".md-search__input")
    page.keyboard.type("token merging")
    result = page.locator(".md-search-result__item", has_text="Token Merging").first
    result.wait_for(timeout=10_000)
    hrefs = page.eval_on_selector_all(
        ".md-search-result__item a", "links => links.map(a => a.getAttribute('href'))"
    )
    shot(page, "search-token-merging")
    assert any(urlsplit(h).path.rstrip("/").endswith("papers/tome") for h in hrefs), hrefs


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
    code = page.locator(".highlight", has_text="@inproceedings{tome,").inner_text()
    assert "Bolya" in code and "booktitle = {ICLR 2023}" in code
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.locator(".highlight", has_text="@inproceedings{tome,").hover()
    page.click("button.md-code__button[data-md-type=copy]")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith("@inproceedings{tome,")
    assert page.get_attribute("a.atc-code", "href") == tome.links.code
    edit = page.get_attribute("a.atc-edit", "href")
    assert edit.endswith("catalog/papers/tome.yaml")
    assert "\nid: tome\n" in page.request.get(url + "/papers/tome/" + edit).text()


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
    assert len(entries) == len(load_catalog().papers)
    first = entries[0]
    assert first.find("a:id", ns).text.startswith("urn:awesome-token-compress:paper:")
    link = first.find("a:link[@rel='alternate']", ns).get("href")
    assert link.startswith("http://127.0.0.1:8000/papers/")
    assert (root / urlsplit(link).path.lstrip("/") / "index.html").is_file()


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
