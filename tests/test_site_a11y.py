"""axe-core on the built site in Chromium: no violation caused by the project's markup.

axe-core is the npm package pinned in package.json, injected from
``node_modules/axe-core/axe.min.js`` (nothing is fetched). Every page kind is
audited in the light and the dark scheme (``prefers-color-scheme``, which
Material's palette follows), on a 1440 px screen and on a phone. Without
axe-core the tests skip, except under CI (``CI`` set), where it is a failure.
"""

from __future__ import annotations

import os

import pytest

from tests.test_site import DESKTOP, PHONE, Browser, Server, build_site, shot
from tools import paths

AXE = paths.ROOT / "node_modules" / "axe-core" / "axe.min.js"
PAGES = (
    "/",
    "/papers/",
    "/papers/tome/",
    "/taxonomy/",
    "/tags/",
    "/contributing/",
    "/comparison/",
    "/performance/",
    "/reference/tome/",
)
# Violations that come only from Material's own markup, never from ours: (rule id, a
# CSS selector of the nodes, why it is not ours to fix). Each must name one rule and
# the theme's element; none is needed today (overrides/main.html fixes the theme's
# unnamed search dialog and the unnamed <nav> around each code block's copy button).
THEME_ONLY: tuple[tuple[str, str, str], ...] = ()

if not AXE.is_file():
    if os.environ.get("CI"):
        pytest.fail(f"axe-core not found at {AXE}; `python dev.py test` installs it (npm ci)")
    pytest.skip("axe-core is not installed (npm ci)", allow_module_level=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("a11y-site")
    build_site(target)
    server = Server(target)
    yield server.url
    server.close()


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def ours(page, violation: dict) -> list[str]:
    """The violation's nodes that are not excused by THEME_ONLY, as readable lines."""
    lines = []
    for node in violation["nodes"]:
        excused = any(
            rule == violation["id"]
            and page.evaluate(
                "([t, s]) => document.querySelector(t).matches(s)", [node["target"][0], selector]
            )
            for rule, selector, _why in THEME_ONLY
        )
        if not excused:
            summary = " ".join(node["failureSummary"].split())[:240]
            lines.append(f"{violation['id']} ({violation['impact']}) {node['target']}: {summary}")
    return lines


@pytest.mark.parametrize(
    ("scheme", "viewport"),
    [("light", DESKTOP), ("dark", DESKTOP), ("light", PHONE), ("dark", PHONE)],
    ids=["light-1440", "dark-1440", "light-390", "dark-390"],
)
def test_no_axe_violation_on_any_page_kind(site, browser, scheme, viewport):
    page = browser.page(viewport, color_scheme=scheme)
    found: dict[str, list[str]] = {}
    for path in PAGES:
        page.goto(site + path, wait_until="load")
        painted = page.evaluate("document.body.dataset.mdColorScheme")
        assert painted == {"light": "default", "dark": "slate"}[scheme], path
        page.add_script_tag(path=str(AXE))
        violations = page.evaluate("async () => (await axe.run()).violations")
        lines = [line for violation in violations for line in ours(page, violation)]
        if lines:
            found[path] = lines
    if viewport is DESKTOP:
        page.goto(site + "/", wait_until="load")
        shot(page, f"home-{scheme}")
    page.context.close()
    report = "\n".join(f"{path}\n  " + "\n  ".join(lines) for path, lines in found.items())
    assert not found, f"axe-core violations ({scheme}, {viewport['width']} px):\n{report}"
