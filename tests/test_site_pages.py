"""Site page texts without a browser: escaping, content of the generators, publishing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import markdown
import pytest
import yaml
from mkdocs.config import load_config
from mkdocs.exceptions import ConfigurationError

from tools import paths
from tools.loader import load_catalog
from tools.site import index_page, pages
from tools.site.feed import render_feed

SCRIPT = "<script>alert(1)</script>"
# The Markdown extensions of mkdocs.yml that can turn text into markup.
EXTENSIONS = ["attr_list", "md_in_html", "tables", "toc", "pymdownx.superfences"]
ATOM = {"a": "http://www.w3.org/2005/Atom"}


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def paper(catalog, paper_id: str):
    return next(p for p in catalog.papers if p.id == paper_id)


def with_papers(catalog, *papers):
    """The catalog holding exactly these (possibly hand-made) papers."""
    entries = tuple(dataclasses.replace(catalog.entries[0], paper=p) for p in papers)
    return dataclasses.replace(catalog, entries=entries)


def body_html(page_text: str) -> str:
    _front, body = page_text.removeprefix("---\n").split("---\n", 1)
    return markdown.markdown(body, extensions=EXTENSIONS)


class Tags(HTMLParser):
    """Every start tag of an HTML fragment with its attributes."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_paper_page_escapes_every_catalog_string(catalog):
    """Defence in depth: even strings the schema would refuse render as text."""
    hostile = paper(catalog, "tome").model_copy(
        update={
            "name": SCRIPT,
            "title": f"{SCRIPT} [x](https://evil.example)",
            "summary": SCRIPT,
            "authors": [SCRIPT],
            "notes": [SCRIPT],
        }
    )
    text = pages.paper_page(catalog, hostile, pages.SiteOptions())
    front, body = text.removeprefix("---\n").split("---\n", 1)
    assert "<script>" not in front
    html = markdown.markdown(body, extensions=EXTENSIONS)
    assert "<script>" not in html and 'href="https://evil.example"' not in html
    assert html.count("&lt;script&gt;") >= 6  # title, name, summary, authors, note, BibTeX


def test_index_page_lists_every_paper_once(catalog):
    text = index_page.index_page(catalog)
    for p in catalog.papers:
        assert text.count(f'data-id="{p.id}"') == 1


def test_edit_link_uses_the_configured_base(catalog):
    tome = paper(catalog, "tome")
    base = "https://example.org/repo/edit/main/"
    text = pages.paper_page(catalog, tome, pages.SiteOptions(edit_base=base))
    assert f'href="{base}catalog/papers/tome.yaml"' in text
    assert 'href="../../catalog/papers/tome.yaml"' in pages.paper_page(
        catalog, tome, pages.SiteOptions()
    )


def test_taxonomy_page_files_each_paper_under_its_terms(catalog):
    text = pages.taxonomy_page(catalog)
    for term in catalog.taxonomy.mechanism:
        assert f"{{ #mechanism-{pages.slug(term)} }}" in text
    merging = text.split("{ #mechanism-merging }", 1)[1].split("###", 1)[0]
    assert "(papers/tome.md)" in merging and "(papers/fastv.md)" not in merging


HOSTILE_TERMS = [
    "x onmouseover=alert(1)",
    'y" onfocus="alert(2)',
    "z { onclick=alert(3) }",
    "w {: .x onclick=alert(4) }",
    "<img src=x onerror=alert(5)>",
]


def test_hostile_taxonomy_terms_render_as_text(catalog):
    """A term is data: on the taxonomy, paper and home pages it is text, its anchor a slug."""
    taxonomy = dataclasses.replace(
        catalog.taxonomy,
        mechanism={
            **catalog.taxonomy.mechanism,
            **{term: f"Hostile {SCRIPT} term." for term in HOSTILE_TERMS},
        },
    )
    tome = paper(catalog, "tome").model_copy(update={"mechanism": HOSTILE_TERMS})
    hostile = dataclasses.replace(with_papers(catalog, tome), taxonomy=taxonomy)
    rendered = {
        "taxonomy": markdown.markdown(pages.taxonomy_page(hostile), extensions=EXTENSIONS),
        "paper": body_html(pages.paper_page(hostile, tome, pages.SiteOptions())),
        "home": body_html(pages.home_page(hostile)),
    }
    for name, page_html in rendered.items():
        tags = Tags(page_html).tags
        assert not [t for t, _ in tags if t in ("script", "img")], name
        handlers = [(t, a) for t, attrs in tags for a in attrs if a.startswith("on")]
        assert handlers == [], name
        ids = [attrs["id"] for _, attrs in tags if "id" in attrs]
        assert all(re.fullmatch(r"[a-z0-9-]+", i) for i in ids), ids
    headings = [attrs for tag, attrs in Tags(rendered["taxonomy"]).tags if tag == "h3"]
    assert all(set(attrs) == {"id"} for attrs in headings)
    texts = [html.unescape(h) for h in re.findall(r"<h3[^>]*>(.*?)</h3>", rendered["taxonomy"])]
    assert set(HOSTILE_TERMS) <= set(texts)
    assert 'href="../../taxonomy/#mechanism-x-onmouseover-alert-1"' in rendered["paper"]
    front = pages.paper_page(hostile, tome, pages.SiteOptions()).split("---\n", 2)[1]
    assert "<img" not in front and "&lt;img" in front  # the tag chips, shown unescaped


def test_term_anchors_are_unique_slugs(catalog):
    taxonomy = dataclasses.replace(
        catalog.taxonomy, stage={"a b": "One.", "a-b": "Two.", "A B": "Three."}
    )
    anchors = pages.term_anchors(taxonomy)
    assert [anchors["stage", t] for t in ("a b", "a-b", "A B")] == [
        "stage-a-b",
        "stage-a-b-2",
        "stage-a-b-3",
    ]


def test_paper_page_heading_holds_the_short_name_once(catalog):
    fastv, atp = paper(catalog, "fastv"), paper(catalog, "atp_llava")
    assert not fastv.title.startswith("FastV") and atp.title.startswith("ATP-LLaVA")
    for p, heading in ((fastv, f"FastV: {fastv.title}"), (atp, atp.title)):
        text = pages.paper_page(catalog, p, pages.SiteOptions())
        front = yaml.safe_load(text.split("---\n", 2)[1])
        assert front["title"] == heading
        assert f"\n# {pages.mdtext(heading)}\n" in text
        assert "ATP-LLaVA: ATP-LLaVA" not in text


def test_paper_page_separates_labels_from_values_for_search(catalog):
    """The search index joins cell texts: "Short nameFastV" unless whitespace separates them."""
    text = pages.paper_page(catalog, paper(catalog, "fastv"), pages.SiteOptions())
    assert "</th><td>" not in text and "</td><td>" not in text
    assert "<th>Short name</th> <td>FastV</td>" in text


def test_paper_page_shows_venue_label_and_unreleased_code(catalog):
    lvp = paper(catalog, "lvp")
    assert lvp.arxiv is None and not lvp.published
    assert "<th>Venue</th> <td>OpenReview</td>" in pages.paper_page(
        catalog, lvp, pages.SiteOptions()
    )
    unreleased = paper(catalog, "tome").model_copy(
        update={"links": paper(catalog, "tome").links.model_copy(update={"code_released": False})}
    )
    text = pages.paper_page(catalog, unreleased, pages.SiteOptions())
    assert ">Repository (no code yet)</a>" in text and ">Code</a>" not in text
    assert ">Code</a>" in pages.paper_page(catalog, paper(catalog, "tome"), pages.SiteOptions())


def test_paper_page_shows_the_measured_speed_under_its_reference(catalog):
    speed = '<p class="atc-speed">2.1× faster at 25% of the tokens</p>'
    text = pages.paper_page(catalog, paper(catalog, "tome"), pages.SiteOptions(), speed=speed)
    section = text.split("## Reference implementation", 1)[1].split("\n## ", 1)[0]
    assert speed in section


def test_home_page_counts_released_code_and_shows_newest_releases(catalog):
    text = pages.home_page(catalog)
    with_code = sum(p.has_code for p in catalog.papers)
    assert with_code < sum(p.links.code is not None for p in catalog.papers)
    assert f"; {with_code} of them have released official code" in text
    newest = max(p.released for p in catalog.papers)
    section = text.split("## Newest releases", 1)[1].split("\n## ", 1)[0]
    for p in catalog.papers:
        if p.released == newest:
            assert f"(papers/{p.id}.md)" in section
    assert "ATP-LLaVA: ATP-LLaVA" not in text
    # Every paper of the catalog was added on one day: "Recently added" would say nothing.
    assert len({p.added for p in catalog.papers}) > 1 or "## Recently added" not in text


def test_home_page_lists_recent_additions_once_dates_differ(catalog):
    later = paper(catalog, "tome").model_copy(update={"added": dt.date(2030, 1, 2)})
    first = dt.date(2026, 11, 24)  # every other entry added on one earlier day
    others = [p.model_copy(update={"added": first}) for p in catalog.papers if p.id != "tome"]
    text = pages.home_page(with_papers(catalog, later, *others))
    section = text.split("## Recently added", 1)[1].split("\n## ", 1)[0]
    assert "| 2030-01-02 | [ToMe: Token Merging" in section
    assert section.count("(papers/") == 1


def test_search_boost_favours_a_name_that_begins_another(catalog):
    boosts = pages.search_boosts(catalog)
    assert boosts["fastv"] > boosts["fastvlm"] == pages.PAPER_SEARCH_BOOST
    assert boosts["tome"] == pages.PAPER_SEARCH_BOOST  # "ToMe" begins no other name
    assert boosts["pyra"] > boosts["pyramiddrop"]
    page = pages.paper_page(catalog, paper(catalog, "fastv"), pages.SiteOptions())
    front_matter = yaml.safe_load(page.split("---\n")[1])  # what MkDocs reads
    assert front_matter["search"]["boost"] == 8
    assert front_matter["title"].startswith("FastV: An Image is Worth 1/2 Tokens")


FORBIDDEN = "Fast\x00V\x01 \x1b[31m\x0b\x7f\x85 \u202eevil\u202c \ud800 \ufffe"


def test_feed_is_well_formed_with_control_characters(catalog):
    tome = paper(catalog, "tome")
    hostile = tome.model_copy(
        update={"name": FORBIDDEN, "title": FORBIDDEN, "authors": [FORBIDDEN], "summary": FORBIDDEN}
    )
    text = render_feed(with_papers(catalog, hostile), "https://example.org/atc/")
    root = ET.fromstring(text.encode("utf-8"))  # raises on ill-formed XML
    entry = root.find("a:entry", ATOM)
    title = entry.find("a:title", ATOM).text
    assert "Fast\ufffdV" in title and "evil" in title
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\ud800-\udfff]", text)


def test_feed_titles_and_links(catalog):
    atp = paper(catalog, "atp_llava")
    published = ET.fromstring(render_feed(with_papers(catalog, atp), "https://example.org/atc"))
    entry = published.find("a:entry", ATOM)
    assert entry.find("a:title", ATOM).text == atp.display_title
    assert entry.find("a:link[@rel='alternate']", ATOM).get("href") == (
        "https://example.org/atc/papers/atp_llava/"
    )
    assert f"({atp.venue_label}, first released" in entry.find("a:summary", ATOM).text
    # No address: relative links, which a reader resolves against the feed's own URL.
    unpublished = ET.fromstring(render_feed(with_papers(catalog, atp), None))
    hrefs = [link.get("href") for link in unpublished.iter(f"{{{ATOM['a']}}}link")]
    assert "papers/atp_llava/" in hrefs and "feed.xml" in hrefs
    assert not [h for h in hrefs if h.startswith("http") and "arxiv.org" not in h]


def site_config(monkeypatch, **env: str):
    """mkdocs.yml as MkDocs loads it, after every plugin's and hook's on_config."""
    for name in ("ATC_REPOSITORY", "SITE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = load_config(str(paths.ROOT / "mkdocs.yml"))
    return config.plugins.on_config(config)


def test_publishing_settings_derive_from_the_repository(monkeypatch):
    config = site_config(monkeypatch, ATC_REPOSITORY="https://github.com/Some-Org/atc-list")
    assert config.site_url == "https://some-org.github.io/atc-list/"
    assert config.extra["edit_base"] == "https://github.com/Some-Org/atc-list/edit/main/"
    assert not config.repo_url  # Material would fetch the repository's stars at view time
    custom = site_config(
        monkeypatch,
        ATC_REPOSITORY="https://github.com/Some-Org/atc-list",
        SITE_URL="https://tokens.example.org/",
    )
    assert custom.site_url == "https://tokens.example.org/"
    assert custom.extra["edit_base"] == "https://github.com/Some-Org/atc-list/edit/main/"


def test_unpublished_site_has_no_absolute_address(monkeypatch):
    config = site_config(monkeypatch)
    assert not config.site_url and config.extra["edit_base"] == ""


def test_repository_setting_must_be_a_github_repository(monkeypatch):
    with pytest.raises(ConfigurationError, match="ATC_REPOSITORY"):
        site_config(monkeypatch, ATC_REPOSITORY="https://github.com/a)[x](javascript:alert(1)")
