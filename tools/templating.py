"""The Jinja environment shared by every renderer."""

from __future__ import annotations

from functools import cache

import jinja2

from tools.markdown import gh_anchor, md_escape


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tools", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # Markdown output: escaping is explicit, with |md
    )
    env.filters["md"] = md_escape
    env.filters["anchor"] = gh_anchor
    env.filters["tags"] = lambda terms: " ".join(f"`{term}`" for term in terms)
    return env
