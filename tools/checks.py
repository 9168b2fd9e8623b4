"""Rules that relate several fields of an entry, or several entries.

Per-field rules (types, enums, URL and id forms) live in ``tools.schema``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tools.problems import Problem
from tools.refs import INFRASTRUCTURE, check_references
from tools.schema import FIELD_ORDER
from tools.taxonomy import Taxonomy

if TYPE_CHECKING:
    from tools.entry import Entry

# Query parameters that change how a page looks, not what it is.
_COSMETIC_QUERY = {"tab", "utm_source", "utm_medium", "utm_campaign"}
_YEAR = re.compile(r"^[0-9]{4}$")
# Token compression acts on Transformers (arXiv 1706.03762); nothing in scope is older.
EARLIEST_RELEASE = "2017-06"
_ERRATA_FIELDS = {*FIELD_ORDER, "links.abstract", "links.pdf", "links.code", "links.project"}


def normalise_url(url: str) -> str:
    """Canonical form used to spot the same page under two spellings."""
    parts = urlsplit(url.strip())
    host = parts.netloc.lower().removeprefix("www.")
    path = parts.path.rstrip("/")
    if host == "github.com":
        path = path.lower()
        for suffix in ("/tree/main", "/tree/master", ".git"):
            path = path.removesuffix(suffix)
    if host == "arxiv.org":
        path = path.replace("/pdf/", "/abs/")
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in _COSMETIC_QUERY]
    return urlunsplit(("https", host, path, urlencode(query), ""))


def check_entry(entry: Entry, taxonomy: Taxonomy, reference_dir: Path) -> list[Problem]:
    paper, path = entry.paper, entry.path
    problems: list[Problem] = []

    def add(field: str, message: str) -> None:
        loc = tuple(field.split("."))
        problems.append(Problem(path, entry.line(*loc), field, message))

    if paper.id != path.stem:
        add("id", f"{paper.id!r} differs from the file name; name the file {paper.id}.yaml")
    if paper.arxiv is None and paper.openreview is None:
        add("arxiv", "an entry needs an arXiv id or an OpenReview id")
    if paper.arxiv:
        first_month = f"20{paper.arxiv[:2]}-{paper.arxiv[2:4]}"
        abstract = f"https://arxiv.org/abs/{paper.arxiv}"
        pinned = paper.links.abstract.removeprefix(abstract)
        # A pinned later version (another paper under the same id) comes out after the id.
        later_version = pinned[:1] == "v" and pinned != "v1"
        if paper.released > first_month and not later_version:
            add("released", f"{paper.released} is after the arXiv submission month {first_month}")
        if not paper.links.abstract.startswith(abstract) or pinned[:1] not in ("", "v"):
            add("links.abstract", f"expected {abstract} (or {abstract}vN to pin a version)")
        elif paper.links.pdf and paper.links.pdf != f"https://arxiv.org/pdf/{paper.arxiv}{pinned}":
            add(
                "links.pdf",
                f"expected https://arxiv.org/pdf/{paper.arxiv}{pinned}"
                + (" (the version the abstract link pins)" if pinned else ""),
            )
    elif paper.openreview:
        forum = f"https://openreview.net/forum?id={paper.openreview}"
        if paper.links.abstract != forum:
            add("links.abstract", f"expected {forum}")

    if paper.released < EARLIEST_RELEASE:
        add("released", f"{paper.released} is before {EARLIEST_RELEASE}, the Transformer's debut")
    elif paper.released > dt.date.today().strftime("%Y-%m"):
        add("released", f"{paper.released} is in the future")
    if paper.venue != "arXiv":
        series, _, year = paper.venue.rpartition(" ")
        if series not in taxonomy.venue_series or not _YEAR.match(year):
            add(
                "venue",
                f"{paper.venue!r}: expected 'arXiv' or '<series> <year>' with a series from "
                f"taxonomy.yaml ({', '.join(taxonomy.venue_series)})",
            )
        elif not paper.year <= int(year) <= dt.date.today().year + 1:
            add("venue", f"year {year} is before the release ({paper.released}) or too far ahead")

    for facet in ("modality", "stage", "mechanism", "orgs"):
        values = getattr(paper, facet)
        if len(set(values)) != len(values):
            add(facet, "lists a term twice")
    if paper.added > dt.date.today():
        add("added", f"{paper.added} is in the future")
    for index, erratum in enumerate(paper.errata):
        if erratum.field not in _ERRATA_FIELDS:
            problems.append(
                Problem(
                    path,
                    entry.line("errata", index, "field"),
                    f"errata[{index}].field",
                    f"{erratum.field!r} is not a field of an entry",
                )
            )
    if paper.reference in INFRASTRUCTURE:
        add(
            "reference",
            f"reference/{paper.reference}.py is shared infrastructure, not one paper's module",
        )
    elif paper.reference and not (reference_dir / f"{paper.reference}.py").is_file():
        add("reference", f"no module reference/{paper.reference}.py")
    return problems


def _duplicates(entries: list[Entry], key, field: str, what: str, shown=None) -> list[Problem]:
    """One problem per entry that shares ``key(entry)`` with an earlier one.

    ``shown(entry, value)`` is what the message quotes (default: the compared value)."""
    seen: dict[str, Entry] = {}
    problems = []
    for entry in entries:
        for value in key(entry):
            if value is None:
                continue
            first = seen.setdefault(value, entry)
            if first is not entry and first.paper.id != entry.paper.id:
                problems.append(
                    Problem(
                        entry.path,
                        entry.line(*field.split(".")),
                        field,
                        f"{what} {shown(entry, value) if shown else value} is also used by "
                        f"{first.path.name}",
                    )
                )
    return problems


_PINNED = re.compile(r"/abs/[^/]+(v[1-9][0-9]*)$")


def _pinned_version(entry: Entry) -> str | None:
    found = _PINNED.search(entry.paper.links.abstract or "")
    return found.group(1) if found else None


def _arxiv_duplicates(entries: list[Entry]) -> list[Problem]:
    """Entries that share an arXiv id. Two papers may share one only when each pins its
    own version in its links (a later version that is another paper: FasterVLM is v1 of
    2412.01818, VisPruner v2)."""
    earlier: dict[str, list[Entry]] = defaultdict(list)
    problems = []
    for entry in entries:
        arxiv = entry.paper.arxiv
        if arxiv is None:
            continue
        mine = _pinned_version(entry)
        for first in earlier[arxiv]:
            theirs = _pinned_version(first)
            if first.paper.id != entry.paper.id and (mine is None or theirs in (None, mine)):
                pin = "" if mine is None or mine != theirs else f" ({mine})"
                problems.append(
                    Problem(
                        entry.path,
                        entry.line("arxiv"),
                        "arxiv",
                        f"arXiv id {arxiv}{pin} is also used by {first.path.name}"
                        + (
                            ""
                            if mine and theirs
                            else "; if a later version is another paper, "
                            "pin each entry's version in links.abstract and links.pdf"
                        ),
                    )
                )
                break
        earlier[arxiv].append(entry)
    return problems


def _text_key(text: str) -> str:
    """Titles and names compared without case, spacing or punctuation differences."""
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


def check_catalog(
    entries: list[Entry],
    taxonomy: Taxonomy,
    reference_dir: Path,
    unreadable: set[str] = frozenset(),
) -> list[Problem]:
    """``unreadable``: ids of entry files that failed to load (no follow-on problems for them)."""
    problems: list[Problem] = []
    for entry in entries:
        problems += check_entry(entry, taxonomy, reference_dir)

    ids: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        ids[entry.paper.id].append(entry)
    for paper_id, same in ids.items():
        for entry in same[1:]:
            problems.append(
                Problem(
                    entry.path,
                    entry.line("id"),
                    "id",
                    f"duplicate id {paper_id!r}; also in {same[0].path.name}",
                )
            )

    problems += check_references(entries, reference_dir, unreadable)
    for field, what in (("title", "the title"), ("name", "the short name")):
        problems += _duplicates(
            entries,
            lambda e, field=field: [_text_key(getattr(e.paper, field))],
            field,
            what,
            lambda e, _, field=field: repr(getattr(e.paper, field)),
        )
    problems += _arxiv_duplicates(entries)
    problems += _duplicates(entries, lambda e: [e.paper.openreview], "openreview", "OpenReview id")
    problems += _duplicates(entries, lambda e: [e.paper.reference], "reference", "module")
    for link in ("abstract", "pdf", "code", "project"):
        problems += _duplicates(
            entries,
            lambda e, link=link: [
                normalise_url(url) if url else None for url in [getattr(e.paper.links, link)]
            ],
            f"links.{link}",
            "URL",
        )
    return problems
