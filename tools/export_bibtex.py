"""The whole catalog as one BibTeX file, one entry per paper keyed by its id."""

from __future__ import annotations

import re

from tools.loader import Catalog
from tools.schema import PaperBase
from tools.taxonomy import Taxonomy

_LATEX_SPECIAL = re.compile(r"([&%$#_{}])")
_LATEX_COMMANDS = {"~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters; UTF-8 letters are kept (biber and bibtex8 read them)."""
    text = re.sub(r"[~^\\]", lambda m: _LATEX_COMMANDS[m.group(0)], text)
    return _LATEX_SPECIAL.sub(r"\\\1", text)


def bibtex_fields(paper: PaperBase, taxonomy: Taxonomy) -> tuple[str, list[tuple[str, str]]]:
    """Entry type and ordered (field, value) pairs, values already escaped."""
    fields: list[tuple[str, str]] = [("title", "{" + latex_escape(paper.title) + "}")]
    if paper.authors:
        fields.append(("author", " and ".join(latex_escape(a) for a in paper.authors)))
    if paper.venue == "arXiv":
        kind = "misc"
        year = paper.year
    else:
        series, _, venue_year = paper.venue.rpartition(" ")
        year = int(venue_year)
        if series in taxonomy.journals:
            kind = "article"
            fields.append(("journal", latex_escape(series)))
        else:
            kind = "inproceedings"
            fields.append(("booktitle", latex_escape(paper.venue)))
    fields.append(("year", str(year)))
    if paper.arxiv:
        fields += [("eprint", paper.arxiv), ("archivePrefix", "arXiv")]
    fields.append(("url", paper.links.abstract))
    return kind, fields


def render_entry(paper: PaperBase, taxonomy: Taxonomy) -> str:
    kind, fields = bibtex_fields(paper, taxonomy)
    body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields)
    return f"@{kind}{{{paper.id},\n{body}\n}}\n"


def render_bibtex(catalog: Catalog) -> str:
    header = "% Generated from catalog/ by `python -m tools export --format bibtex`.\n\n"
    return header + "\n".join(render_entry(p, catalog.taxonomy) for p in catalog.papers)
