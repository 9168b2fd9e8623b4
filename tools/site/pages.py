"""Text of every generated site page, from a validated catalog.

Every catalog string reaches the page through Jinja autoescaping (HTML
contexts) or ``mdtext`` (Markdown contexts), so whatever an entry contains is
shown as text, never interpreted as HTML or Markdown.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2
import yaml
from markupsafe import Markup, escape

from tools.export_bibtex import render_bibtex, render_entry
from tools.export_json import render_json
from tools.loader import Catalog
from tools.markdown import md_escape
from tools.schema import PaperBase
from tools.site.reference_pages import describe_setting

FACETS = ("modality", "target", "stage", "mechanism", "training")
RECENT = 12


def mdtext(value: object) -> Markup:
    """Escape for a Markdown context: HTML entities first, then Markdown syntax."""
    return Markup(md_escape(str(escape(value))))


@cache
def site_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tools", "templates/site"),
        undefined=jinja2.StrictUndefined,
        autoescape=True,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["mdtext"] = mdtext
    env.filters["setting"] = describe_setting
    env.filters["yaml_str"] = lambda value: Markup(json.dumps(str(value), ensure_ascii=False))
    return env


@dataclass(frozen=True)
class SiteOptions:
    """Settings from mkdocs.yml's ``extra``: where "Edit this page" points."""

    edit_base: str = ""  # e.g. https://github.com/<org>/<repo>/edit/main/ ; empty: the YAML copy

    def edit_url(self, paper: PaperBase, depth: int) -> str:
        path = f"catalog/papers/{paper.id}.yaml"
        return self.edit_base + path if self.edit_base else "../" * depth + path


def _render(template: str, **context) -> str:
    return site_environment().get_template(template).render(**context)


def facet_values(paper: PaperBase, facet: str) -> list[str]:
    value = getattr(paper, facet)
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def home_page(catalog: Catalog) -> str:
    papers = catalog.papers
    counts = {
        facet: Counter(v for p in papers for v in facet_values(p, facet)).most_common()
        for facet in ("modality", "mechanism")
    }
    years = sorted(Counter(p.year for p in papers).items(), reverse=True)
    recent = sorted(papers, key=lambda p: (p.added, p.released), reverse=True)[:RECENT]
    return _render(
        "home.md.j2",
        papers=papers,
        counts=counts,
        years=years,
        recent=recent,
        taxonomy=catalog.taxonomy,
    )


def page_title(paper: PaperBase) -> str:
    """Browser and search title: the short name and the title, once each."""
    if paper.title.lower().startswith(paper.name.lower()):
        return paper.title
    return f"{paper.name}: {paper.title}"


def paper_page(catalog: Catalog, paper: PaperBase, options: SiteOptions, speed: str = "") -> str:
    """``speed``: an HTML fragment with the measured speedup (``tools.site.benchmarks``)."""
    front_matter = yaml.safe_dump(
        # MkDocs themes insert the page title and description unescaped.
        {
            "title": str(escape(page_title(paper))),
            "description": str(escape(paper.summary)),
            "tags": [*paper.mechanism, *paper.modality],
        },
        sort_keys=False,
        allow_unicode=True,
    )
    return _render(
        "paper.md.j2",
        paper=paper,
        front_matter=Markup(front_matter),
        bibtex=render_entry(paper, catalog.taxonomy).rstrip("\n"),
        edit_url=options.edit_url(paper, depth=2),
        taxonomy=catalog.taxonomy,
        speed=Markup(speed),
    )


def taxonomy_page(catalog: Catalog) -> str:
    by_term = {
        facet: {
            term: [p for p in catalog.papers if term in facet_values(p, facet)]
            for term in catalog.taxonomy.facet(facet)
        }
        for facet in FACETS
    }
    return _render("taxonomy.md.j2", taxonomy=catalog.taxonomy, facets=FACETS, by_term=by_term)


def performance_page(
    catalog_bench: Path, reference_results: dict[str, dict], vlm_results: dict[str, dict]
) -> str:
    """Timing tables from the committed benchmark results; says so when none exist."""
    result = None
    if catalog_bench.is_file():
        result = json.loads(catalog_bench.read_text(encoding="utf-8"))
    return _render("performance.md.j2", result=result, reference=reference_results, vlm=vlm_results)


def reference_index_page(catalog: Catalog, modules: list, contract: str) -> str:
    papers = {p.id: p for p in catalog.papers}
    return _render(
        "reference_index.md.j2",
        modules=[m for m in modules if m.catalog_id in papers],
        papers=papers,
        contract=Markup(contract),
    )


def _rows_for(results: dict[str, dict], catalog_id: str) -> list[tuple[str, dict]]:
    return [
        (device, row)
        for device, data in sorted(results.items())
        for row in data["results"]
        if row["method"] == catalog_id
    ]


def reference_module_page(
    module, paper: PaperBase, results: dict[str, dict], vlm_results: dict[str, dict]
) -> str:
    # The docstring and source are the project's own code, rendered as Markdown and code.
    module = module.__class__(
        **{
            **module.__dict__,
            "docstring": Markup(module.docstring),
            "source": Markup(module.source),
        }
    )
    return _render(
        "reference_module.md.j2",
        module=module,
        paper=paper,
        rows=_rows_for(results, module.catalog_id),
        vlm_rows=_rows_for(vlm_results, module.catalog_id),
        gpu="cuda" in results or "cuda" in vlm_results,
    )


def summary_nav() -> str:
    """literate-nav's SUMMARY.md. Paper pages stay out of the navigation: Material
    renders the whole navigation into every page, so listing thousands of papers
    there makes the build quadratic; the papers index is how people reach them."""
    return _render("SUMMARY.md.j2")


def downloads(catalog: Catalog) -> dict[str, str]:
    """Static files next to the pages: the exports."""
    return {
        "downloads/catalog.json": render_json(catalog),
        "downloads/papers.bib": render_bibtex(catalog),
    }
