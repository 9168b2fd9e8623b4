"""An Atom feed (RFC 4287) of the catalog's papers, newest additions first.

Links are absolute when the site has an address (``site_url``, see
``tools/site/hooks.py``). Without one they are relative references, which a feed
reader resolves against the address it fetched ``feed.xml`` from (RFC 4287 §7;
the feed lies at the site's root), so they are never a wrong absolute address.
"""

from __future__ import annotations

import datetime as dt
import re
import xml.etree.ElementTree as ET

from tools.loader import Catalog

ATOM = "http://www.w3.org/2005/Atom"
LIMIT = 100
# Characters XML 1.0 forbids (C0 controls but tab, LF and CR; surrogates; U+FFFE, U+FFFF),
# those it discourages (C1 controls), and bidirectional overrides and isolates, which
# could reorder what a reader shows. ElementTree writes all of them as they are.
_UNSAFE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff\u202a-\u202e\u2066-\u2069]"
)


def xml_text(value: str) -> str:
    """``value`` with every character XML 1.0 forbids or discourages replaced by U+FFFD."""
    return _UNSAFE.sub("\ufffd", value)


def _stamp(day: dt.date) -> str:
    return dt.datetime.combine(day, dt.time(0, 0), tzinfo=dt.UTC).isoformat()


def render_feed(catalog: Catalog, site_url: str | None) -> str:
    """Entries are papers by date added; ids are stable URNs.

    ``site_url``: the site's address; empty or ``None``: links relative to the feed.
    """
    base = site_url.rstrip("/") + "/" if site_url else ""
    papers = sorted(catalog.papers, key=lambda p: (p.added, p.released, p.id), reverse=True)
    ET.register_namespace("", ATOM)
    feed = ET.Element(f"{{{ATOM}}}feed")

    def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs) -> ET.Element:
        attrs = {key: xml_text(value) for key, value in attrs.items()}
        element = ET.SubElement(parent, f"{{{ATOM}}}{tag}", attrs)
        element.text = None if text is None else xml_text(text)
        return element

    sub(feed, "id", "urn:awesome-token-compress:papers")
    sub(feed, "title", "Awesome Token Compress: new papers")
    sub(
        feed, "subtitle", "Papers on visual token compression, by the date they joined the catalog."
    )
    sub(
        feed, "updated", _stamp(max(p.added for p in papers)) if papers else _stamp(dt.date.today())
    )
    sub(feed, "link", href=f"{base}feed.xml", rel="self", type="application/atom+xml")
    sub(feed, "link", href=base or "./", rel="alternate", type="text/html")
    author = sub(feed, "author")
    sub(author, "name", "Awesome Token Compress")
    for paper in papers[:LIMIT]:
        entry = sub(feed, "entry")
        sub(entry, "id", f"urn:awesome-token-compress:paper:{paper.id}")
        sub(entry, "title", paper.display_title)
        sub(entry, "updated", _stamp(paper.added))
        sub(entry, "link", href=f"{base}papers/{paper.id}/", rel="alternate", type="text/html")
        sub(entry, "link", href=paper.links.abstract, rel="related")
        for name in paper.authors or []:
            sub(sub(entry, "author"), "name", name)
        for term in paper.mechanism:
            sub(entry, "category", term=term)
        sub(
            entry,
            "summary",
            f"{paper.summary} ({paper.venue_label}, first released {paper.released}.)",
        )
    ET.indent(feed)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(feed, encoding="unicode") + "\n"
