"""What a catalog string may contain: the rules shared by the schema and the taxonomy.

Every string reaches the README (Markdown), the site (HTML) and the Atom feed
(XML). The renderers escape for their context; these rules keep out what no
escaping makes harmless or readable: markup, control and bidirectional-override
characters (which also make XML ill-formed), and URLs that are not plain http(s).
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import urlsplit

_HTML_TAG = re.compile(r"</?[A-Za-z!][^>]*>")
_MD_LINK = re.compile(r"\]\s*\(|!\[")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$")
# RFC 3986 characters of a path, query and fragment: unreserved, sub-delims, ":@/?" and
# "%" escapes. Anything else (space, quotes, "<>", "[]", "{}", "\", "|", "^", "`",
# non-ASCII, control characters) must be percent-encoded by whoever writes the URL.
_URL_REST = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#]|%[0-9A-Fa-f]{2})*$")
URL_LIMIT = 2000


def bad_character(value: str) -> str | None:
    """Describe the first control, format (e.g. U+202E) or separator character, if any."""
    if value.isprintable():  # C-speed fast path: True for ordinary text, spaces included
        return None
    for char in value:
        if not char.isprintable() and char != " ":
            name = unicodedata.name(char, "")
            return f"U+{ord(char):04X}" + (f" {name}" if name else "")
    return None


def plain_text_problem(value: str) -> str | None:
    """Why ``value`` is not one line of plain text, or None when it is."""
    if value != value.strip():
        return "has leading or trailing whitespace"
    if "\n" in value or "\r" in value:
        return "must be a single line"
    char = bad_character(value)
    if char:
        return f"contains the invisible or control character {char}; plain text only"
    tag = _HTML_TAG.search(value)
    if tag:
        return f"contains an HTML tag ({tag.group(0)!r}); plain text only"
    if _MD_LINK.search(value):
        return "contains Markdown link or image syntax; plain text only"
    if "`" in value:
        return "contains a backtick; plain text only"
    return None


# The whole rule in one expression: the common case needs no parsing.
_PLAIN_URL = re.compile(
    r"https?://(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
    r"(?:[/?#](?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#]|%[0-9A-Fa-f]{2})*)?"
)


def url_problem(value: str) -> str | None:
    """Why ``value`` is not an absolute http(s) URL made of URL characters, or None."""
    if len(value) <= URL_LIMIT and _PLAIN_URL.fullmatch(value):
        return None
    if len(value) > URL_LIMIT:
        return f"is {len(value)} characters long; the limit is {URL_LIMIT}"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        return f"not a URL ({exc}): {value!r}"
    if parts.scheme not in ("http", "https") or not value.startswith(parts.scheme + "://"):
        return f"not an http(s) URL: {value!r}"
    if parts.username is not None or parts.password is not None:
        return f"a URL must not carry a user name or password: {value!r}"
    host = parts.hostname or ""
    expected_netloc = host if port is None else f"{host}:{port}"
    if not _HOST.fullmatch(host) or parts.netloc.lower() != expected_netloc.lower():
        return f"not an http(s) URL with a domain name: {value!r}"
    rest = value[len(parts.scheme) + 3 + len(parts.netloc) :]
    if rest and not rest.startswith(("/", "?", "#")):
        return f"not an http(s) URL: {value!r}"
    if not _URL_REST.fullmatch(rest):
        bad = next((c for c in rest if not re.match(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?#%]", c)), "%")
        shown = repr(bad) if bad.isprintable() else f"U+{ord(bad):04X}"
        return (
            f"contains {shown}, which a URL may not carry: percent-encode it "
            f"(or a malformed % escape): {value!r}"
        )
    return None
