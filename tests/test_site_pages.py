"""Site page texts without a browser: escaping and content of the generators."""

from __future__ import annotations

import markdown
import pytest

from tools.loader import load_catalog
from tools.site import index_page, pages

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def test_paper_page_escapes_every_catalog_string(catalog):
    """Defence in depth: even strings the schema would refuse render as text."""
    tome = next(p for p in catalog.papers if p.id == "tome")
    hostile = tome.model_copy(
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
    html = markdown.markdown(
        body, extensions=["attr_list", "md_in_html", "tables", "pymdownx.superfences"]
    )
    assert "<script>" not in html and 'href="https://evil.example"' not in html
    assert html.count("&lt;script&gt;") >= 6  # title, name, summary, authors, note, BibTeX


def test_index_page_lists_every_paper_once(catalog):
    text = index_page.index_page(catalog)
    for paper in catalog.papers:
        assert text.count(f'data-id="{paper.id}"') == 1


def test_edit_link_uses_the_configured_base(catalog):
    tome = next(p for p in catalog.papers if p.id == "tome")
    base = "https://example.org/repo/edit/main/"
    text = pages.paper_page(catalog, tome, pages.SiteOptions(edit_base=base))
    assert f'href="{base}catalog/papers/tome.yaml"' in text
    assert 'href="../../catalog/papers/tome.yaml"' in pages.paper_page(
        catalog, tome, pages.SiteOptions()
    )


def test_taxonomy_page_files_each_paper_under_its_terms(catalog):
    text = pages.taxonomy_page(catalog)
    for term in catalog.taxonomy.mechanism:
        assert f"{{ #mechanism-{term} }}" in text
    merging = text.split("{ #mechanism-merging }", 1)[1].split("###", 1)[0]
    assert "(papers/tome.md)" in merging and "(papers/fastv.md)" not in merging
