"""The papers index (``papers/index.md``): one filterable, sortable table of every paper.

The filter controls are rendered here (their options come from the catalog, in
taxonomy order); ``docs/javascripts/papers-index.js`` makes them work, keeps
their state in the URL, and sorts; ``docs/stylesheets/papers-index.css`` lays the
table out (cards on a phone). Without JavaScript the full table still shows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tools.loader import Catalog
from tools.schema import PaperBase
from tools.site.pages import _render, facet_values
from tools.site.reference_pages import read_modules

# Facets offered as a drop-down, in the order the filters show them.
SELECT_FACETS = (
    ("modality", "Modality"),
    ("target", "Target"),
    ("stage", "Stage"),
    ("mechanism", "Mechanism"),
    ("training", "Training"),
    ("venue", "Venue"),
    ("year", "Year"),
)
# Not venues: listed after every conference and journal series.
UNPUBLISHED = ("arXiv", "OpenReview")
OFFICIAL_BASIS = "official code"


@dataclass(frozen=True)
class Option:
    value: str
    count: int


@dataclass(frozen=True)
class Row:
    paper: PaperBase
    basis: str | None  # what the reference module follows; None without a module

    @property
    def provisional(self) -> bool:
        return self.basis is not None and self.basis != OFFICIAL_BASIS


def row_values(paper: PaperBase, facet: str) -> list[str]:
    """The values a row is filtered on; ``venue`` is the series, one value even with spaces."""
    if facet == "venue":
        return [paper.venue_series]
    if facet == "year":
        return [str(paper.year)]
    return facet_values(paper, facet)


def _venue_order(series: str) -> tuple[int, str]:
    if series in UNPUBLISHED:
        return (1 + UNPUBLISHED.index(series), "")
    return (0, series.casefold())


def facet_options(catalog: Catalog, facet: str) -> list[Option]:
    """The values in use: taxonomy order, venues by name (unpublished last), years newest first."""
    counts = Counter(v for p in catalog.papers for v in row_values(p, facet))
    if facet == "venue":
        order = sorted(counts, key=_venue_order)
    elif facet == "year":
        order = sorted(counts, reverse=True)
    else:
        order = [term for term in catalog.taxonomy.facet(facet) if term in counts]
    return [Option(value, counts[value]) for value in order]


def search_text(paper: PaperBase) -> str:
    """What the text box matches besides the visible cells: summary and authors."""
    return " ".join([paper.summary, *(paper.authors or [])])


def index_page(catalog: Catalog) -> str:
    modules = {m.name: m for m in read_modules(catalog.reference_dir)}
    rows = [
        Row(p, modules[p.reference].basis if p.reference in modules else None)
        for p in catalog.papers
    ]
    filters = [(key, label, facet_options(catalog, key)) for key, label in SELECT_FACETS]
    return _render(
        "index.md.j2",
        rows=rows,
        filters=filters,
        row_values=row_values,
        search_text=search_text,
    )
