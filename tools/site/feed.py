"""An Atom feed (RFC 4287) of the catalog's papers, newest additions first."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

from tools.loader import Catalog

ATOM = "http://www.w3.org/2005/Atom"
LIMIT = 100


def _stamp(day: dt.date) -> str:
    return dt.datetime.combine(day, dt.time(0, 0), tzinfo=dt.UTC).isoformat()


def render_feed(catalog: Catalog, site_url: str) -> str:
    """Entries are papers by date added; ids are stable URNs, links absolute."""
    site_url = site_url.rstrip("/") + "/"
    papers = sorted(catalog.papers, key=lambda p: (p.added, p.released, p.id), reverse=True)
    ET.register_namespace("", ATOM)
    feed = ET.Element(f"{{{ATOM}}}feed")

    def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs) -> ET.Element:
        element = ET.SubElement(parent, f"{{{ATOM}}}{tag}", attrs)
        element.text = text
        return element

    sub(feed, "id", "urn:awesome-token-compress:papers")
    sub(feed, "title", "Awesome Token Compress: new papers")
    sub(
        feed, "subtitle", "Papers on visual token compression, by the date they joined the catalog."
    )
    sub(
        feed, "updated", _stamp(max(p.added for p in papers)) if papers else _stamp(dt.date.today())
    )
    sub(feed, "link", href=f"{site_url}feed.xml", rel="self", type="application/atom+xml")
    sub(feed, "link", href=site_url, rel="alternate", type="text/html")
    author = sub(feed, "author")
    sub(author, "name", "Awesome Token Compress")
    for paper in papers[:LIMIT]:
        entry = sub(feed, "entry")
        sub(entry, "id", f"urn:awesome-token-compress:paper:{paper.id}")
        sub(entry, "title", f"{paper.name}: {paper.title}")
        sub(entry, "updated", _stamp(paper.added))
        sub(entry, "link", href=f"{site_url}papers/{paper.id}/", rel="alternate", type="text/html")
        sub(entry, "link", href=paper.links.abstract, rel="related")
        for name in paper.authors or []:
            sub(sub(entry, "author"), "name", name)
        for term in paper.mechanism:
            sub(entry, "category", term=term)
        sub(entry, "summary", f"{paper.summary} ({paper.venue}, first released {paper.released}.)")
    ET.indent(feed)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(feed, encoding="unicode") + "\n"
