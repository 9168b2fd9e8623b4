"""The papers index (``papers/index.md``): one filterable, sortable table of every paper.

The page's behaviour lives in ``docs/javascripts/papers-index.js`` and its layout in
``docs/stylesheets/papers-index.css``.
"""

from __future__ import annotations

from tools.loader import Catalog
from tools.site.pages import FACETS, _render, facet_values


def index_page(catalog: Catalog) -> str:
    return _render("index.md.j2", papers=catalog.papers, facets=FACETS, facet_values=facet_values)
