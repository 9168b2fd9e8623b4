"""The Jinja environment of the README templates (GitHub Markdown).

Every ``{{ ... }}`` is escaped as inline text unless a filter below produced it:
``md`` (inline text), ``code`` and ``tags`` (code spans), ``url`` (a link
destination), ``count`` (a number and its noun) and ``name_title`` (a paper's
short name and title). Those return
``Md``, text already fit for the README, which is then kept as it is.
"""

from __future__ import annotations

from functools import cache

import jinja2

from tools.markdown import code_span, gfm_text, link_target


class Md(str):
    """Text that is already Markdown: the template writes it as it is."""


def md(value: object) -> Md:
    return value if isinstance(value, Md) else Md(gfm_text(str(value)))


def url(value: object) -> Md:
    return Md(link_target(str(value)))


def code(value: object) -> Md:
    return Md(code_span(str(value)))


def tags(terms: object) -> Md:
    return Md(" ".join(code_span(str(term)) for term in terms))


def count(n: int, one: str, many: str) -> Md:
    """``1 paper``, ``2 papers``: the number and the word that goes with it."""
    return Md(f"{n} {gfm_text(one if n == 1 else many)}")


def name_title(paper) -> Md:
    """``**Name**: Title``, or ``**Name** rest of the title`` when the title starts with it.

    The text is the paper's ``display_title``, with the short name in bold.
    """
    name, title = paper.name, paper.title
    if paper.display_title != title:
        return Md(f"**{gfm_text(name)}**: {gfm_text(title)}")
    lead = title[: len(name)]
    if lead.casefold() != name.casefold():  # casefold changed the length (e.g. "ß")
        return Md(gfm_text(title))
    return Md(f"**{gfm_text(lead)}**{gfm_text(title[len(name) :])}")


def _finalize(value: object) -> str:
    if isinstance(value, Md):
        return value
    if isinstance(value, int):
        return str(value)
    return gfm_text(str(value))


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tools", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # not HTML: Markdown escaping is done by _finalize and the filters
        finalize=_finalize,
    )
    env.filters.update(md=md, url=url, code=code, tags=tags, count=count, name_title=name_title)
    return env
