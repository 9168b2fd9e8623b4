"""README rendering: generated regions only, atomic, byte-identical on rerun."""

from __future__ import annotations

import pytest

from tools.loader import load_catalog
from tools.render_readme import ReadmeError, render_readme


def test_render_is_byte_identical_on_rerun(ws, cli):
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    first = ws.readme.read_bytes()
    mtime = ws.readme.stat().st_mtime_ns
    result = cli("render", *ws.args("--readme", ws.readme))
    assert result.code == 0 and "unchanged" in result.out
    assert ws.readme.read_bytes() == first
    assert ws.readme.stat().st_mtime_ns == mtime


def test_hand_written_parts_are_kept(ws, cli):
    text = ws.readme.read_text(encoding="utf-8")
    text = text.replace("## Adding a paper", "## Adding a paper\n\nA note a person wrote.", 1)
    ws.readme.write_text(text, encoding="utf-8")
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    rendered = ws.readme.read_text(encoding="utf-8")
    assert "A note a person wrote." in rendered
    # Only the generated regions differ from what the person wrote.
    head, tail = (
        text.split("<!-- BEGIN GENERATED: summary", 1)[0],
        text.rsplit("<!-- END GENERATED: papers -->", 1)[1],
    )
    assert rendered.startswith(head) and rendered.endswith(tail)


def test_check_reports_stale_readme_and_writes_nothing(ws, cli):
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    assert cli("render", "--check", *ws.args("--readme", ws.readme)).code == 0
    ws.entry_path("fastv").unlink()
    before = ws.readme.read_bytes()
    result = cli("render", "--check", *ws.args("--readme", ws.readme))
    assert result.code == 1 and "stale" in result.err
    assert ws.readme.read_bytes() == before


def test_generated_list_has_every_paper_with_its_links(ws, cli):
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    text = ws.readme.read_text(encoding="utf-8")
    for paper in load_catalog(ws.catalog, ws.reference).papers:
        line = next(row for row in text.splitlines() if f"]({paper.links.abstract})" in row)
        assert f"**{paper.name}**" in line and paper.venue in line
        if paper.links.code:
            assert f"[Code]({paper.links.code})" in line


def test_title_markdown_characters_are_escaped(ws, cli):
    path = ws.entry_path("fastv")
    data = ws.load_entry("fastv")
    text = path.read_text(encoding="utf-8").replace(
        data["title"], "[CLS] Attention *is* All_You_Need | x"
    )
    path.write_text(text, encoding="utf-8")
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    readme = ws.readme.read_text(encoding="utf-8")
    assert r"[\[CLS\] Attention \*is\* All\_You\_Need \| x](" in readme


def test_readme_without_markers_is_refused(ws):
    catalog = load_catalog(ws.catalog, ws.reference)
    with pytest.raises(ReadmeError, match="lacks the generated region"):
        render_readme("# My list\n\nno markers here\n", catalog)


def test_sections_follow_the_original_structure(ws, cli):
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    text = ws.readme.read_text(encoding="utf-8")
    # VLM before ViT, years newest first, each heading reachable from the contents.
    assert text.index("## VLM") < text.index("## ViT")
    assert text.index("### ViT, 2022") < text.index("### ViT, 2022") + 1
    assert "[2022](#vit-2022)" in text and "### ViT, 2022" in text
