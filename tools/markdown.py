"""Escaping for text that goes into Markdown (README, site pages).

``md_escape`` serves the site, whose Markdown (Python-Markdown) gets text that is
HTML-escaped first. The README is read by GitHub (CommonMark with GitHub's
extensions), and gets every catalog string through ``gfm_text`` (inline text),
``code_span`` (a term shown as code) or ``link_target`` (a URL in ``[...](...)``):
whatever the string holds, it renders as itself and cannot end the construct it
sits in, start a block, or run script.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from urllib.parse import quote

_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|#])")

# CommonMark lets a backslash escape any ASCII punctuation. These can start inline
# markup on GitHub: emphasis, code, links and images, raw HTML, table cells,
# strikethrough (~) and math ($); and "&" where it starts an entity ("&lt;", "&#58;").
_ENTITY = r"&(?=#[0-9]+;|#[xX][0-9a-fA-F]+;|[A-Za-z0-9]+;)"
_ENTITY_START = re.compile(_ENTITY)
_GFM_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|#!~$]|" + _ENTITY + ")")
# Characters that end a line or reorder what a reader sees: none belongs in one
# line of a list item. (Bidirectional controls can make a title read differently.)
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# What a link destination keeps as is: RFC 3986 unreserved and reserved characters,
# and '%' of existing escapes, less the ones that end or confuse a Markdown link
# destination: ( ) < > ' and (not listed) space, backslash, double quote, backtick.
_URL_KEEP = "-._~:/?#[]@!$&*+,;=%"
_URL_PLAIN = re.compile(r"^[A-Za-z0-9\-._~:/?#\[\]@!$&*+,;=%]*\Z")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
SAFE_SCHEMES = frozenset({"http", "https"})


class UnsafeUrl(ValueError):
    """A URL that a rendered link must not point at (a scheme other than http(s))."""


def md_escape(text: str) -> str:
    """Backslash-escape Markdown and HTML metacharacters so text renders as itself."""
    return _SPECIAL.sub(r"\\\1", text)


def one_line(text: str) -> str:
    """``text`` with line breaks, other control characters and bidi controls shown as U+FFFD."""
    if text.isprintable():  # fast path: every character below is non-printable
        return text
    return "".join(
        "\ufffd" if ch in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch
        for ch in text
    )


def gfm_text(text: str) -> str:
    """Inline text for GitHub Markdown: one line, every markup character escaped."""
    if text.isprintable() and not _GFM_SPECIAL.search(text):
        return text  # most titles: nothing to escape
    return _GFM_SPECIAL.sub(r"\\\1", one_line(text))


@lru_cache(maxsize=4096)  # a few hundred taxonomy terms, on every paper
def code_span(text: str) -> str:
    """``text`` as an inline code span, whatever backticks it holds."""
    text = one_line(text)
    runs = [len(run) for run in re.findall(r"`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    # A space on each side keeps a leading or trailing backtick out of the fence;
    # CommonMark strips exactly one space from each side.
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def link_target(url: str) -> str:
    """``url`` as a Markdown link destination: http(s) or a relative path, percent-encoded.

    Raises ``UnsafeUrl`` for any other scheme (``javascript:``, ``data:``...). Characters
    that could end the destination or the link (``)``, ``<``, ``>``, spaces, line breaks),
    backslashes, quotes and every non-ASCII character are percent-encoded; an ``&``
    that starts an entity is backslash-escaped, since Markdown decodes entities in a
    destination (``javascript&#58;`` would be ``javascript:``).
    """
    scheme = _SCHEME.match(url)
    if scheme and scheme.group(1).lower() not in SAFE_SCHEMES:
        raise UnsafeUrl(f"refusing to link to {url!r}: only http(s) URLs and relative paths")
    if not _URL_PLAIN.match(url):  # fast path: nothing to encode (almost every URL)
        url = quote(url, safe=_URL_KEEP)
    return _ENTITY_START.sub(r"\\&", url) if "&" in url else url


class Slugger:
    """GitHub's heading anchors, in document order: a repeated heading gets ``-1``, ``-2``..."""

    def __init__(self) -> None:
        self.occurrences: dict[str, int] = {}

    def slug(self, heading: str) -> str:
        original = result = gh_anchor(heading)
        while result in self.occurrences:
            self.occurrences[original] += 1
            result = f"{original}-{self.occurrences[original]}"
        self.occurrences[result] = 0
        return result


def gh_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")
