"""Text of every generated site page, from a validated catalog.

Every catalog string reaches the page through Jinja autoescaping (HTML
contexts) or ``mdtext`` (Markdown contexts), so whatever an entry contains is
shown as text, never interpreted as HTML or Markdown.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from tools.export_bibtex import render_bibtex, render_entry
from tools.export_json import render_json
from tools.loader import Catalog
from tools.markdown import md_escape
from tools.schema import PaperBase
from tools.site.reference_pages import describe_arguments, describe_setting
from tools.taxonomy import Taxonomy

FACETS = ("modality", "target", "stage", "mechanism", "training")
RECENT = 12
# Search rank of a paper page against pages that only mention the paper (lunr document boost).
PAPER_SEARCH_BOOST = 4


def mdtext(value: object) -> Markup:
    """Escape for a Markdown context: HTML entities first, then Markdown syntax."""
    return Markup(md_escape(str(escape(value))))


def slug(text: str) -> str:
    """Lower-case ASCII letters and digits joined by '-': safe as an id and in a URL."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "term"


@cache
def term_anchors(taxonomy: Taxonomy) -> dict[tuple[str, str], str]:
    """The taxonomy page's anchor of each (facet, term): ``facet-<slug of term>``.

    Terms are data; an anchor made from the raw term would let a term such as
    ``x onmouseover=alert(1)`` become attributes of its heading. Two terms whose
    slugs collide get ``-2``, ``-3``, ... in file order.
    """
    anchors: dict[tuple[str, str], str] = {}
    taken: set[str] = set()
    for facet in FACETS:
        for term in taxonomy.facet(facet):
            base = anchor = f"{facet}-{slug(term)}"
            n = 1
            while anchor in taken:
                n += 1
                anchor = f"{base}-{n}"
            taken.add(anchor)
            anchors[facet, term] = anchor
    return anchors


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
    env.filters["arguments"] = describe_arguments
    env.filters["yaml_str"] = lambda value: Markup(json.dumps(str(value), ensure_ascii=False))
    return env


@dataclass(frozen=True)
class SiteOptions:
    """Publishing settings (``tools/site/hooks.py``): where "Edit this page" points."""

    edit_base: str = ""  # e.g. https://github.com/<org>/<repo>/edit/main/ ; empty: the YAML copy
    repository: str = ""  # e.g. https://github.com/<org>/<repo> ; empty: not published

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


def newest_releases(papers: list[PaperBase], limit: int = RECENT) -> list[PaperBase]:
    """Papers of the latest months of first release: whole months, until ``limit`` is reached."""
    months = sorted({p.released for p in papers}, reverse=True)
    chosen: list[PaperBase] = []
    for month in months:
        if len(chosen) >= limit:
            break
        chosen += sorted(
            (p for p in papers if p.released == month), key=lambda p: p.name.casefold()
        )
    return chosen


def recently_added(papers: list[PaperBase], limit: int = RECENT) -> list[PaperBase]:
    """Papers added after the first day of the catalog, newest first; none while all share it."""
    if not papers:
        return []
    first = min(p.added for p in papers)
    later = [p for p in papers if p.added > first]
    return sorted(later, key=lambda p: (p.added, p.released, p.id), reverse=True)[:limit]


def home_page(catalog: Catalog, options: SiteOptions | None = None) -> str:
    papers = catalog.papers
    counts = {
        facet: Counter(v for p in papers for v in facet_values(p, facet)).most_common()
        for facet in ("modality", "mechanism")
    }
    years = sorted(Counter(p.year for p in papers).items(), reverse=True)
    return _render(
        "home.md.j2",
        papers=papers,
        with_code=sum(p.has_code for p in papers),
        with_reference=sum(p.reference is not None for p in papers),
        counts=counts,
        years=years,
        newest=newest_releases(papers),
        recent=recently_added(papers),
        taxonomy=catalog.taxonomy,
        anchors=term_anchors(catalog.taxonomy),
        repository=(options or SiteOptions()).repository,
    )


def _search_words(name: str) -> str:
    return " ".join(re.findall(r"[0-9a-z]+", name.casefold()))


def search_boosts(catalog: Catalog) -> dict[str, float]:
    """The lunr document boost of each paper page, by paper id.

    Material's search reads every typed word as a prefix, and of the words it
    expands to, the rarer scores higher: typed in full, "FastV" would rank
    FastVLM first. A paper whose short name begins another paper's short name
    gets twice the boost, which puts it first when its name is typed.
    """
    names = sorted({_search_words(p.name) for p in catalog.papers})
    boosts = {}
    for paper in catalog.papers:
        words = _search_words(paper.name)
        # Names that begin with `words` follow it in sorted order.
        after = bisect.bisect_right(names, words)
        prefix = bool(words) and after < len(names) and names[after].startswith(words)
        boosts[paper.id] = PAPER_SEARCH_BOOST * (2 if prefix else 1)
    return boosts


def paper_page(
    catalog: Catalog,
    paper: PaperBase,
    options: SiteOptions,
    speed: str = "",
    search_boost: float | None = None,
) -> str:
    """``speed``: an HTML fragment with the measured speedup (``tools.site.benchmarks``).

    ``search_boost``: ``search_boosts(catalog)[paper.id]``, computed once per build.
    """
    if search_boost is None:
        search_boost = search_boosts(catalog)[paper.id]
    # JSON is YAML (a flow mapping), and json.dumps is ~50x faster than yaml.safe_dump:
    # a second of the 5,000-paper build. The schema refuses the characters (U+2028, ...)
    # that YAML would read as line breaks.
    front_matter = json.dumps(
        # MkDocs themes insert the page title and description unescaped.
        {
            "title": str(escape(paper.display_title)),
            "description": str(escape(paper.summary)),
            # The tags plugin reads `topics` (mkdocs.yml): the chips and the Tags page.
            "topics": [str(escape(term)) for term in (*paper.mechanism, *paper.modality)],
            # Material's search indexes `tags` with a high boost (and shows them as HTML
            # in its results): the short name, so typing it finds this page first.
            "tags": [str(escape(paper.name))],
            "search": {"boost": search_boost},
        },
        ensure_ascii=False,
    )
    return _render(
        "paper.md.j2",
        paper=paper,
        front_matter=Markup(front_matter),
        bibtex=render_entry(paper, catalog.taxonomy).rstrip("\n"),
        edit_url=options.edit_url(paper, depth=2),
        taxonomy=catalog.taxonomy,
        anchors=term_anchors(catalog.taxonomy),
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
    return _render(
        "taxonomy.md.j2",
        taxonomy=catalog.taxonomy,
        facets=FACETS,
        by_term=by_term,
        anchors=term_anchors(catalog.taxonomy),
    )


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
    module,
    paper: PaperBase,
    results: dict[str, dict],
    vlm_results: dict[str, dict],
    projector_results: dict[str, dict] | None = None,
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
        projector_rows=_rows_for(projector_results or {}, module.catalog_id),
        gpu="cuda" in results or "cuda" in vlm_results or "cuda" in (projector_results or {}),
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
