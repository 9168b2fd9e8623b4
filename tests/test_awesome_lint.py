"""The README follows the awesome-list convention: awesome-lint (pinned in package.json).

The committed README, and one rendered from a tiny catalog, must report zero errors.
Without ``node_modules/.bin/awesome-lint`` (``python dev.py test`` installs it with
``npm ci``) these tests skip, except under CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_render import add_module
from tools import paths

AWESOME_LINT = paths.ROOT / "node_modules" / ".bin" / "awesome-lint"

if not AWESOME_LINT.exists():
    if os.environ.get("CI"):
        pytest.fail(f"{AWESOME_LINT} not found; `python dev.py test` installs it (npm ci)")
    pytest.skip("awesome-lint is not installed (npm ci)", allow_module_level=True)


def awesome_lint(folder: Path) -> tuple[int, str]:
    """Exit status and report of awesome-lint on ``folder/README.md``."""
    result = subprocess.run(
        [str(AWESOME_LINT), "README.md"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"},
    )
    return result.returncode, result.stdout + result.stderr


def assert_clean(folder: Path) -> None:
    code, report = awesome_lint(folder)
    assert code == 0 and "✖" not in report, report


def test_committed_readme_has_no_error():
    assert_clean(paths.ROOT)


def test_readme_rendered_from_a_tiny_catalog_has_no_error(ws, cli):
    # One ViT paper with a provisional module and one VLM paper with an official one,
    # so the references region has its list of provisional modules.
    add_module(ws, "tome", "abstract only (no official code)")
    add_module(ws, "fastv", "official code")
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    shutil.copy(paths.ROOT / "contributing.md", ws.root / "contributing.md")
    assert_clean(ws.root)


def test_the_check_fails_on_a_broken_item(tmp_path):
    # The README's own form, less the " - " between the link and the description.
    text = paths.README.read_text(encoding="utf-8")
    broken, n = re.subn(r"(?m)^(- \[.+?\]\(https://arxiv\.org/[^)]+\)) - ", r"\1 ", text, count=1)
    assert n == 1
    (tmp_path / "README.md").write_text(broken, encoding="utf-8")
    shutil.copy(paths.ROOT / "contributing.md", tmp_path / "contributing.md")
    code, report = awesome_lint(tmp_path)
    assert code != 0 and "must be separated with a dash" in report


def test_awesome_badge_is_beside_the_main_heading():
    # awesome-lint checks the badge only on a heading that opens the file; this one
    # follows the comment that turns the awesome-github rule off (see its reason there).
    text = paths.README.read_text(encoding="utf-8")
    assert text.startswith("<!--lint disable awesome-github-->\n")
    heading = next(line for line in text.splitlines() if line.startswith("# "))
    assert heading.endswith(" [![Awesome](https://awesome.re/badge.svg)](https://awesome.re)")
