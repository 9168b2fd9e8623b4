"""Render the catalog into the generated regions of ``README.md``.

The README is hand-written except between marker comments::

    <!-- BEGIN GENERATED: papers ... -->
    ...replaced on every render...
    <!-- END GENERATED: papers -->

Everything outside the markers is kept byte for byte. The regions are

- ``summary``: counts of papers, venues, code and terms;
- ``contents``: the table of contents, made from the README's own level-2 headings
  after it (hand-written ones included), so it cannot miss a section;
- ``papers``: the list itself, one awesome-list item per paper;
- ``references``: counts of the reference implementations, and which are provisional.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from itertools import groupby
from pathlib import Path

from tools.loader import Catalog
from tools.markdown import Slugger, gfm_text
from tools.site.reference_pages import Module, read_modules
from tools.templating import Md, environment

REGIONS = ("summary", "contents", "papers", "references")
_REGION = re.compile(
    r"(?P<begin><!-- BEGIN GENERATED: (?P<name>[a-z-]+)\b[^\n]*?-->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- END GENERATED: (?P=name) -->)",
    re.S,
)
TARGET_ORDER = ("VLM", "ViT")
OFFICIAL = "official code"
# Sections that the awesome-list convention keeps out of the table of contents.
NOT_IN_CONTENTS = frozenset({"Contributing", "Footnotes", "Related Lists"})
# A line that opens or closes a fenced code block, or an ATX heading.
_BLOCK_LINE = re.compile(
    r"^ {0,3}(?:(?P<fence>`{3,}|~{3,}).*"
    r"|(?P<hashes>#{1,6})[ \t]+(?P<text>.*?)(?:[ \t]+#+)?[ \t]*)$",
    re.M,
)
_INLINE_MARKUP = re.compile(r"\\([!-/:-@\[-`{-~])|!?\[([^\]]*)\]\([^)]*\)|[`*_]")


class ReadmeError(ValueError):
    """The README's marker comments are missing or malformed."""


# A year with more papers than this is split by main modality, so it reads in one screen.
SPLIT_YEAR_ABOVE = 12


def _by_modality(target: str, year: int, papers: list, order: list[str]) -> list[dict]:
    """Sub-groups of one year by each paper's main (first) modality, in taxonomy order."""
    if len(papers) <= SPLIT_YEAR_ABOVE:
        return []
    rank = {term: i for i, term in enumerate(order)}
    groups = []
    for modality in sorted({p.modality[0] for p in papers}, key=lambda m: rank.get(m, 99)):
        members = [p for p in papers if p.modality[0] == modality]
        groups.append({"heading": f"{target}, {year}: {modality}", "papers": members})
    return groups


def sections(catalog: Catalog) -> list[dict]:
    """Papers grouped as the original list: target, then year, newest first; a long year
    is split by main modality (``groups``)."""
    out = []
    order = list(catalog.taxonomy.modality)
    for target in TARGET_ORDER:
        papers = [p for p in catalog.papers if p.target == target]
        years = []
        for year, group in groupby(papers, key=lambda p: p.year):
            members = list(group)
            years.append(
                {
                    "year": year,
                    "heading": f"{target}, {year}",
                    "papers": members,
                    "groups": _by_modality(target, year, members, order),
                }
            )
        out.append({"target": target, "count": len(papers), "years": years})
    return out


@lru_cache(maxsize=4)
def _read_modules(reference_dir: Path, stamp: tuple) -> tuple[Module, ...]:
    return tuple(read_modules(reference_dir))


def reference_modules(reference_dir: Path) -> tuple[Module, ...]:
    """``read_modules``, parsed again only when a module file changed (name, size, mtime)."""
    stamp = tuple(
        (path.name, stat.st_size, stat.st_mtime_ns)
        for path in sorted(reference_dir.glob("*.py"))
        for stat in [path.stat()]
    )
    return _read_modules(reference_dir, stamp)


def reference_summary(catalog: Catalog) -> dict:
    """Reference modules by the target of their paper, and the provisional ones.

    A module is provisional when its ``basis`` is not the official code: it was
    written from the paper, the abstract or someone else's code.
    """
    by_id = {p.id: p for p in catalog.papers}
    modules = [m for m in reference_modules(catalog.reference_dir) if m.catalog_id in by_id]
    counts = Counter(by_id[m.catalog_id].target for m in modules)
    provisional = [
        {"module": m.name, "paper": by_id[m.catalog_id], "basis": m.basis}
        for m in modules
        if m.basis != OFFICIAL
    ]
    provisional.sort(key=lambda row: row["paper"].name.casefold())
    return {
        "total": len(modules),
        "by_target": [(t, counts[t]) for t in TARGET_ORDER if counts[t]],
        "provisional": provisional,
        "provisional_modules": frozenset(row["module"] for row in provisional),
    }


def _headings(text: str) -> list[tuple[int, int, str]]:
    """``(offset, level, source text)`` of every ATX heading outside fenced code."""
    found, fence = [], None
    for match in _BLOCK_LINE.finditer(text):
        opened = match.group("fence")
        if fence is not None:
            if opened and opened[0] == fence[0] and len(opened) >= len(fence):
                fence = None
        elif opened:
            fence = opened
        elif match.group("hashes"):
            found.append((match.start(), len(match.group("hashes")), match.group("text")))
    return found


def _plain(heading: str) -> str:
    """A heading's text as GitHub reads it for the anchor: links to their text, no markup."""
    return _INLINE_MARKUP.sub(lambda m: m.group(1) or m.group(2) or "", heading)


def contents(text: str, after: int, catalog_sections: list[dict]) -> list[dict]:
    """The table of contents: every level-2 heading after offset ``after``.

    A target's entry (``VLM``) also links to its year headings.
    """
    slugger, by_heading, entries = Slugger(), {}, []
    for offset, level, heading in _headings(text):
        anchor = slugger.slug(_plain(heading))
        by_heading.setdefault(heading, anchor)
        if offset > after and level == 2 and _plain(heading) not in NOT_IN_CONTENTS:
            entries.append({"heading": Md(heading), "anchor": anchor})
    targets = {gfm_text(s["target"]): s for s in catalog_sections}
    for entry in entries:
        section = targets.get(entry["heading"])
        entry["count"] = section["count"] if section else None
        entry["years"] = [
            {"year": y["year"], "anchor": by_heading.get(gfm_text(y["heading"]), "")}
            for y in (section["years"] if section else [])
        ]
    return entries


def _context(catalog: Catalog) -> dict:
    papers = catalog.papers
    counts = {
        facet: Counter(term for p in papers for term in getattr(p, facet))
        for facet in ("modality", "mechanism")
    }
    return {
        "catalog": catalog,
        "papers": papers,
        "sections": sections(catalog),
        "counts": counts,
        "venues": sum(p.published for p in papers),
        "with_code": sum(p.has_code for p in papers),
        "repository_only": sum(p.links.code is not None and not p.has_code for p in papers),
        "references": reference_summary(catalog),
        "taxonomy": catalog.taxonomy,
    }


def render_regions(catalog: Catalog) -> dict[str, str]:
    """The bodies of the regions that depend on the catalog only (all but ``contents``)."""
    return _render_regions(_context(catalog))


def _render_regions(context: dict) -> dict[str, str]:
    env = environment()
    return {
        name: env.get_template(f"readme_{name}.md.j2").render(context)
        for name in REGIONS
        if name != "contents"
    }


def _regions(current: str) -> list[re.Match]:
    """The generated regions of ``current``: each of ``REGIONS`` exactly once."""
    matches = list(_REGION.finditer(current))
    found = [m.group("name") for m in matches]
    missing = [name for name in REGIONS if name not in found]
    if missing:
        raise ReadmeError(
            "README.md lacks the generated region(s) "
            + ", ".join(
                f"'<!-- BEGIN GENERATED: {n} -->' ... '<!-- END GENERATED: {n} -->'"
                for n in missing
            )
        )
    unknown = sorted(set(found) - set(REGIONS))
    if unknown or len(found) != len(set(found)):
        raise ReadmeError(f"README.md has unknown or repeated generated regions: {found}")
    return matches


def render_readme(current: str, catalog: Catalog) -> str:
    """Return ``current`` with every generated region re-rendered."""
    matches = _regions(current)
    context = _context(catalog)
    bodies = _render_regions(context)
    # The table of contents lists the headings as they are once the other regions are
    # rendered: the papers' sections and every hand-written section after it. It is
    # made last, from the README with only its own heading in its place.
    bodies["contents"] = "## Contents\n"
    pieces, pos, toc_at, toc_end = [], 0, 0, 0
    for match in matches:
        name = match.group("name")
        pieces += [current[pos : match.end("begin")], bodies[name].rstrip("\n") + "\n"]
        if name == "contents":
            toc_at = len(pieces) - 1
            toc_end = sum(map(len, pieces))
        pos = match.start("end")
    pieces.append(current[pos:])
    entries = contents("".join(pieces), toc_end, context["sections"])
    toc = environment().get_template("readme_contents.md.j2").render(entries=entries)
    pieces[toc_at] = toc.rstrip("\n") + "\n"
    return "".join(pieces)
