"""Escaping for text that goes into Markdown (README, site pages)."""

from __future__ import annotations

import re

_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|#])")


def md_escape(text: str) -> str:
    """Backslash-escape Markdown and HTML metacharacters so text renders as itself."""
    return _SPECIAL.sub(r"\\\1", text)


def gh_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")
