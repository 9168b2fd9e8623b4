"""README rendering: generated regions only, safe for any string, byte-identical on rerun."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tools.loader import Catalog, load_catalog
from tools.markdown import UnsafeUrl
from tools.render_readme import _REGION, ReadmeError, render_readme

# A reference module as `python -m tools validate` and the README read it (statically).
MODULE = '''"""{name}: a reference implementation for the tests."""


class Reducer:
    catalog_id = "{id}"
    basis = "{basis}"
'''


def outside_regions(text: str) -> str:
    """The hand-written parts: the README with every generated region emptied."""
    return _REGION.sub(lambda m: m.group("begin") + m.group("end"), text)


def region(text: str, name: str) -> str:
    return next(m.group("body") for m in _REGION.finditer(text) if m.group("name") == name)


def paper_line(text: str, paper) -> str:
    return next(row for row in text.splitlines() if f"]({paper.links.abstract})" in row)


def add_module(ws, paper_id: str, basis: str) -> None:
    """Give ``paper_id`` a reference module whose ``basis`` is ``basis``."""
    (ws.reference / f"{paper_id}.py").write_text(
        MODULE.format(name=paper_id, id=paper_id, basis=basis), encoding="utf-8"
    )
    path = ws.entry_path(paper_id)
    text = path.read_text(encoding="utf-8").replace("reference: null", f"reference: {paper_id}")
    path.write_text(text, encoding="utf-8")


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
    heading = "## About the original list"
    assert heading in text
    text = text.replace(heading, f"{heading}\n\nA note a person wrote.", 1)
    ws.readme.write_text(text, encoding="utf-8")
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    rendered = ws.readme.read_text(encoding="utf-8")
    assert "A note a person wrote." in rendered
    # Only the generated regions differ from what the person wrote.
    assert outside_regions(rendered) == outside_regions(text)
    assert rendered != text  # the workspace's 3 papers replaced the real list


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
        line = paper_line(text, paper)
        # The awesome-list form: "- [title](link) - description."
        assert line.startswith(f"- [**{paper.name}**")
        assert f"]({paper.links.abstract}) - {paper.venue_label} · " in line
        assert line.endswith(".")
        if paper.links.code:
            assert f"[Code]({paper.links.code})" in line


def test_name_is_not_repeated_when_the_title_starts_with_it(ws):
    catalog = load_catalog(ws.catalog, ws.reference)
    tome = next(p for p in catalog.papers if p.id == "tome")
    patched = replace_papers(
        catalog,
        tome=tome.model_copy(update={"name": "ToMe", "title": "ToMe: Token Merging"}),
    )
    text = render_readme(ws.readme.read_text(encoding="utf-8"), patched)
    assert "[**ToMe**: Token Merging](" in text
    assert "ToMe: ToMe" not in text


def test_title_markdown_characters_are_escaped(ws, cli):
    path = ws.entry_path("fastv")
    data = ws.load_entry("fastv")
    text = path.read_text(encoding="utf-8").replace(
        data["title"], "[CLS] Attention *is* All_You_Need | x"
    )
    path.write_text(text, encoding="utf-8")
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    readme = ws.readme.read_text(encoding="utf-8")
    assert r"**FastV**: \[CLS\] Attention \*is\* All\_You\_Need \| x](" in readme


def replace_papers(catalog: Catalog, **papers) -> Catalog:
    """``catalog`` with some papers swapped for objects the schema would refuse."""
    entries = tuple(
        dataclasses.replace(e, paper=papers[e.paper.id]) if e.paper.id in papers else e
        for e in catalog.entries
    )
    return dataclasses.replace(catalog, entries=entries)


HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_TITLE = (
    "Nice](javascript:alert(1)) *b* _i_ `c` ~~s~~ $m$ &lt; |\n# Heading\n<script>x</script>"
)
HOSTILE_CODE_URL = "https://github.com/a)[Click](javascript:alert(2))"
HOSTILE_ABSTRACT = "https://arxiv.org/abs/2403.06764\n<script>y</script>"


def hostile_catalog(ws) -> Catalog:
    """The workspace catalog, with every string of FastV that reaches the README hostile."""
    catalog = load_catalog(ws.catalog, ws.reference)
    fastv = next(p for p in catalog.papers if p.id == "fastv")
    links = fastv.links.model_copy(
        update={
            "abstract": HOSTILE_ABSTRACT,
            "code": HOSTILE_CODE_URL,
            "project": "https://example.org/a b<c>\u00e9",
        }
    )
    hostile = fastv.model_copy(
        update={
            "name": HOSTILE_NAME,
            "title": HOSTILE_TITLE,
            "venue": "ICLR 2025 <b>x</b>",  # shown as is: venue_label of a published paper
            "orgs": ["<img src=y onerror=alert(3)>", "A\u202eB"],
            "modality": ["image`<b>`"],
            "training": "x\ny",
            "links": links,
            "reference": "../x) [y](javascript:z",
        }
    )
    return replace_papers(catalog, fastv=hostile)


def test_hostile_strings_render_inert(ws):
    text = render_readme(ws.readme.read_text(encoding="utf-8"), hostile_catalog(ws))
    papers = region(text, "papers")
    # One list item, one line: no string can start a heading, an HTML block or a new item.
    item = [row for row in papers.splitlines() if "onerror=alert(1)" in row]
    assert len(item) == 1
    (line,) = item
    assert "# Heading" not in papers.replace(r"\# Heading", "")
    # Markup and HTML metacharacters are escaped, so they show as text.
    assert r"**\<img src=x onerror=alert(1)\>**: Nice\](javascript:alert(1)) \*b\* \_i\_" in line
    assert r"\`c\` \~\~s\~\~ \$m\$ \&lt; \|" in line
    assert r"\<script\>x\</script\>" in line and "<script>" not in papers
    assert r"ICLR 2025 \<b\>x\</b\>" in line
    assert r"\<img src=y onerror=alert(3)\>, A" in line and "\u202e" not in papers
    # URLs cannot leave their link: ")", "<", ">", spaces and line breaks are encoded.
    assert "](https://arxiv.org/abs/2403.06764%0A%3Cscript%3Ey%3C/script%3E) - " in line
    assert "[Code](https://github.com/a%29[Click]%28javascript:alert%282%29%29)" in line
    assert "[Project](https://example.org/a%20b%3Cc%3E%C3%A9)" in line
    assert "[Reference](reference/../x%29%20[y]%28javascript:z.py)" in line
    # Terms are code spans that their own backticks cannot close.
    assert "`` image`<b>` ``" in line and "`x\ufffdy`" in line


def test_links_other_than_http_are_refused(ws):
    catalog = load_catalog(ws.catalog, ws.reference)
    fastv = next(p for p in catalog.papers if p.id == "fastv")
    for url in ("javascript:alert(1)", "JavaScript:alert(1)", "data:text/html,x"):
        links = fastv.links.model_copy(update={"project": url})
        bad = replace_papers(catalog, fastv=fastv.model_copy(update={"links": links}))
        with pytest.raises(UnsafeUrl, match="only http"):
            render_readme(ws.readme.read_text(encoding="utf-8"), bad)


def test_entity_in_a_url_cannot_spell_a_scheme(ws):
    catalog = load_catalog(ws.catalog, ws.reference)
    fastv = next(p for p in catalog.papers if p.id == "fastv")
    links = fastv.links.model_copy(update={"project": "javascript&#58;alert(1)"})
    bad = replace_papers(catalog, fastv=fastv.model_copy(update={"links": links}))
    text = render_readme(ws.readme.read_text(encoding="utf-8"), bad)
    # Markdown decodes entities in a link destination; the backslash keeps "&#58;" as text.
    assert r"[Project](javascript\&#58;alert%281%29)" in text


def test_code_not_released_is_marked_and_not_counted(ws, cli):
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    before = region(ws.readme.read_text(encoding="utf-8"), "summary")
    path = ws.entry_path("fastv")
    text = path.read_text(encoding="utf-8")
    text, n = re.subn(r"(?m)^(  code: .+)$", r"\1\n  code_released: false", text)
    assert n == 1
    path.write_text(text, encoding="utf-8")
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    readme = ws.readme.read_text(encoding="utf-8")
    fastv = next(p for p in load_catalog(ws.catalog, ws.reference).papers if p.id == "fastv")
    line = paper_line(readme, fastv)
    assert f"[Repository (no code yet)]({fastv.links.code})" in line
    assert "[Code](" not in line
    with_code = int(re.search(r"(\d+) with official code", before).group(1))
    after = region(readme, "summary")
    assert f"{with_code - 1} with official code" in after
    assert "(and 1 with an official repository that holds no code yet)" in after


def test_provisional_references_are_marked_and_counted_by_target(ws, cli):
    add_module(ws, "tome", "abstract only (no official code)")  # ViT
    add_module(ws, "fastv", "official code")  # VLM
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    text = ws.readme.read_text(encoding="utf-8")
    papers = {p.id: p for p in load_catalog(ws.catalog, ws.reference).papers}
    assert "[Reference (provisional)](reference/tome.py)" in paper_line(text, papers["tome"])
    fastv = paper_line(text, papers["fastv"])
    assert "[Reference](reference/fastv.py)" in fastv and "provisional" not in fastv
    refs = region(text, "references")
    assert "**2 papers have a reference implementation here**: " in refs
    assert "here**: 1 VLM method and 1 ViT method." in refs
    assert "1 of them is provisional" in refs
    assert "- ToMe (ViT, `reference/tome.py`): abstract only (no official code)." in refs
    assert "FastV (" not in refs


def test_readme_without_markers_is_refused(ws):
    catalog = load_catalog(ws.catalog, ws.reference)
    with pytest.raises(ReadmeError, match="lacks the generated region"):
        render_readme("# My list\n\nno markers here\n", catalog)


def test_contents_lists_every_section_after_it(ws, cli):
    text = ws.readme.read_text(encoding="utf-8")
    text = text.replace("## Contributing", "## A new section\n\nText.\n\n## Contributing", 1)
    ws.readme.write_text(text, encoding="utf-8")
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    rendered = ws.readme.read_text(encoding="utf-8")
    contents = region(rendered, "contents")
    after = rendered[rendered.index("<!-- END GENERATED: contents -->") :]
    sections = [
        h for h in re.findall(r"(?m)^## (.+)$", after) if h != "Contributing"
    ]  # no fenced code starts a line with "## " in this README
    listed = re.findall(r"(?m)^- \[([^\]]+)\]\(#", contents)
    assert listed == sections and "A new section" in listed
    assert "- [A new section](#a-new-section)" in contents
    assert "Contributing" not in contents  # the awesome-list convention leaves it out


def test_sections_follow_the_original_structure(ws, cli):
    assert cli("render", *ws.args("--readme", ws.readme)).code == 0
    text = ws.readme.read_text(encoding="utf-8")
    # VLM before ViT, each year heading reachable from the contents.
    assert text.index("## VLM") < text.index("## ViT")
    assert "- [ViT](#vit) (2 papers): [2022](#vit-2022)" in text and "### ViT, 2022" in text
    assert "- [VLM](#vlm) (1 paper): [2024](#vlm-2024)" in text and "### VLM, 2024" in text


def test_a_long_year_is_split_by_main_modality_and_a_short_one_is_not():
    from tools.render_readme import SPLIT_YEAR_ABOVE, sections

    catalog = load_catalog()
    for section in sections(catalog):
        for year in section["years"]:
            if len(year["papers"]) > SPLIT_YEAR_ABOVE:
                assert year["groups"], f"{year['heading']} has {len(year['papers'])} papers"
                grouped = [p.id for g in year["groups"] for p in g["papers"]]
                assert sorted(grouped) == sorted(p.id for p in year["papers"])  # each once
                for group in year["groups"]:
                    modality = group["heading"].rsplit(": ", 1)[1]
                    assert all(p.modality[0] == modality for p in group["papers"])
            else:
                assert year["groups"] == []
