"""Render the catalog into the generated regions of ``README.md``.

The README is hand-written except between marker comments::

    <!-- BEGIN GENERATED: papers ... -->
    ...replaced on every render...
    <!-- END GENERATED: papers -->

Everything outside the markers is kept byte for byte.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import groupby

from tools.loader import Catalog
from tools.markdown import gh_anchor
from tools.templating import environment

REGIONS = ("summary", "papers")
_REGION = re.compile(
    r"(?P<begin><!-- BEGIN GENERATED: (?P<name>[a-z-]+)\b[^\n]*?-->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- END GENERATED: (?P=name) -->)",
    re.S,
)
TARGET_ORDER = ("VLM", "ViT")


class ReadmeError(ValueError):
    """The README's marker comments are missing or malformed."""


def sections(catalog: Catalog) -> list[dict]:
    """Papers grouped as the original list: target, then year, newest first."""
    out = []
    for target in TARGET_ORDER:
        papers = [p for p in catalog.papers if p.target == target]
        years = [
            {"year": year, "anchor": gh_anchor(f"{target}, {year}"), "papers": list(group)}
            for year, group in groupby(papers, key=lambda p: p.year)
        ]
        out.append(
            {"target": target, "anchor": gh_anchor(target), "count": len(papers), "years": years}
        )
    return out


def render_regions(catalog: Catalog) -> dict[str, str]:
    env = environment()
    papers = catalog.papers
    counts = {
        facet: Counter(term for p in papers for term in getattr(p, facet))
        for facet in ("modality", "mechanism")
    }
    context = {
        "catalog": catalog,
        "papers": papers,
        "sections": sections(catalog),
        "counts": counts,
        "venues": sum(p.venue != "arXiv" for p in papers),
        "with_code": sum(p.links.code is not None for p in papers),
        "taxonomy": catalog.taxonomy,
    }
    return {name: env.get_template(f"readme_{name}.md.j2").render(context) for name in REGIONS}


def render_readme(current: str, catalog: Catalog) -> str:
    """Return ``current`` with every generated region re-rendered."""
    found = [m.group("name") for m in _REGION.finditer(current)]
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
    bodies = render_regions(catalog)

    def replace(match: re.Match) -> str:
        body = bodies[match.group("name")]
        return match.group("begin") + body.rstrip("\n") + "\n" + match.group("end")

    return _REGION.sub(replace, current)
