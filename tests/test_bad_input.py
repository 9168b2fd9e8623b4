"""Bad catalog input: a clear path:line: field: message, exit 1, and nothing written."""

from __future__ import annotations

import pytest

TOME_TITLE = 'title: "Token Merging: Your ViT But Faster"'


def line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


# (case id, file, old text, new text, field reported, words in the message, line anchor)
CASES = [
    ("malformed-yaml", "tome", TOME_TITLE, "title: [Token Merging", "(file)", "invalid YAML", None),
    (
        "unknown-key",
        "tome",
        "orgs: []",
        "orgs: []\ncolour: red",
        "colour",
        "unknown key",
        "colour:",
    ),
    (
        "wrong-enum",
        "tome",
        "mechanism: [merging]",
        "mechanism: [mergeing]",
        "mechanism[0]",
        "Input should be 'pruning'",
        "mechanism:",
    ),
    ("missing-field", "tome", "venue: ICLR 2023\n", "", "venue", "required field is missing", None),
    (
        "bad-arxiv-id",
        "tome",
        'arxiv: "2210.09461"',
        'arxiv: "2213.09461"',
        "arxiv",
        "does not match",
        "arxiv:",
    ),
    (
        "unquoted-arxiv-id",
        "tome",
        'arxiv: "2210.09461"',
        "arxiv: 2210.09461",
        "arxiv",
        "must be a quoted string",
        "arxiv:",
    ),
    (
        "bad-url",
        "tome",
        "code: https://github.com/facebookresearch/ToMe",
        "code: github.com/facebookresearch/ToMe",
        "links.code",
        "not an http(s) URL",
        "code:",
    ),
    (
        "malformed-arxiv-url",
        "tome",
        "pdf: https://arxiv.org/pdf/2210.09461",
        "pdf: https://arxiv.org/abs/2210.09461.pdf",
        "links.pdf",
        "malformed arXiv URL",
        "pdf:",
    ),
    (
        "title-html",
        "tome",
        TOME_TITLE,
        'title: "Token <script>alert(1)</script> Merging"',
        "title",
        "HTML tag",
        "title:",
    ),
    (
        "title-markdown-link",
        "tome",
        TOME_TITLE,
        'title: "[Token Merging](https://example.com)"',
        "title",
        "Markdown link",
        "title:",
    ),
    (
        "bad-venue",
        "tome",
        "venue: ICLR 2023",
        "venue: ICLR'23",
        "venue",
        "expected 'arXiv'",
        "venue:",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_entry_is_reported_and_nothing_is_written(ws, cli, case):
    _, paper_id, old, new, field, words, anchor = case
    path = ws.entry_path(paper_id)
    text = path.read_text(encoding="utf-8")
    assert old in text, "fixture drifted from the real entry"
    broken = text.replace(old, new, 1)
    path.write_text(broken, encoding="utf-8")
    before = ws.snapshot()

    result = cli("validate", *ws.args())
    assert result.code == 1
    line = line_of(broken, anchor) if anchor else None
    expected = f"{path}:{line}: {field}: " if line else f"{path}:"
    matching = [row for row in result.err.splitlines() if row.startswith(expected)]
    assert matching, result.err
    assert any(words in row and f": {field}: " in row for row in matching), result.err

    for command in (
        ["build", *ws.args("--readme", ws.readme)],
        ["render", *ws.args("--readme", ws.readme)],
        ["export", "--format", "json", "-o", ws.root / "out.json", *ws.args()],
        ["export", "--format", "bibtex", "-o", ws.root / "out.bib", *ws.args()],
    ):
        assert cli(*command).code == 1
    assert ws.snapshot() == before, "a failed command wrote a file"


def test_malformed_yaml_reports_its_line(ws, cli):
    path = ws.entry_path("tome")
    text = path.read_text(encoding="utf-8").replace(TOME_TITLE, 'title: "unterminated', 1)
    path.write_text(text, encoding="utf-8")
    result = cli("validate", *ws.args())
    assert result.code == 1
    assert f"{path}:" in result.err and "invalid YAML" in result.err


def test_duplicate_id(ws, cli):
    ws.write_entry("tome_copy", ws.entry_path("tome").read_text(encoding="utf-8"))
    result = cli("validate", *ws.args())
    assert result.code == 1
    copy = ws.entry_path("tome_copy")
    assert f"{copy}:2: id: duplicate id 'tome'; also in tome.yaml" in result.err
    assert f"{copy}:2: id: 'tome' differs from the file name" in result.err


def test_duplicate_arxiv_id(ws, cli):
    path = ws.entry_path("evit")
    text = path.read_text(encoding="utf-8").replace('arxiv: "2202.07800"', 'arxiv: "2210.09461"')
    path.write_text(text, encoding="utf-8")
    result = cli("validate", *ws.args())
    assert result.code == 1
    line = line_of(text, "arxiv:")
    # evit sorts before tome, so the later file (tome) is the one reported.
    tome = ws.entry_path("tome")
    tome_line = line_of(tome.read_text(encoding="utf-8"), "arxiv:")
    assert f"{tome}:{tome_line}: arxiv: arXiv id 2210.09461 is also used by evit.yaml" in result.err
    assert f"{path}:" in result.err and line > 0


def _copy_real(ws, paper_id: str) -> str:
    from tools import paths

    text = (paths.CATALOG / "papers" / f"{paper_id}.yaml").read_text(encoding="utf-8")
    text = text.replace(f"reference: {paper_id}", "reference: null")
    ws.write_entry(paper_id, text)
    return text


def test_two_papers_share_an_arxiv_id_only_when_each_pins_its_version(ws, cli):
    """FasterVLM is v1 of 2412.01818 and VisPruner v2 (released later than the id's month)."""
    _copy_real(ws, "fastervlm")
    vispruner = _copy_real(ws, "vispruner")
    assert cli("validate", *ws.args()).code == 0
    unpinned = vispruner.replace("2412.01818v2", "2412.01818")
    ws.write_entry("vispruner", unpinned)
    result = cli("validate", *ws.args())
    assert result.code == 1
    path = ws.entry_path("vispruner")
    assert f"{path}:{line_of(unpinned, 'arxiv:')}: arxiv: arXiv id 2412.01818 is also" in result.err
    assert "pin each entry's version" in result.err
    assert "after the arXiv submission month" in result.err  # unpinned: not a later version
    ws.write_entry("vispruner", vispruner.replace("2412.01818v2", "2412.01818v1"))
    result = cli("validate", *ws.args())
    assert result.code == 1 and "arXiv id 2412.01818 (v1) is also used by fastervlm" in result.err


def test_same_code_link_under_two_spellings_is_a_duplicate(ws, cli):
    path = ws.entry_path("evit")
    data = ws.load_entry("evit")
    text = path.read_text(encoding="utf-8").replace(
        data["links"]["code"],
        "https://github.com/FacebookResearch/ToMe/tree/main?tab=readme-ov-file",
    )
    path.write_text(text, encoding="utf-8")
    result = cli("validate", *ws.args())
    assert result.code == 1
    assert "links.code: URL https://github.com/facebookresearch/tome is also used by" in result.err


def test_every_problem_is_reported_at_once(ws, cli):
    for paper_id in ("tome", "evit"):
        path = ws.entry_path(paper_id)
        path.write_text(path.read_text(encoding="utf-8") + "colour: red\n", encoding="utf-8")
    result = cli("validate", *ws.args())
    assert result.code == 1
    assert result.err.count("colour: unknown key") == 2
    assert "2 problem(s); nothing was written" in result.err


def test_reference_module_must_exist(ws, cli):
    path = ws.entry_path("tome")
    path.write_text(path.read_text(encoding="utf-8").replace("reference: null", "reference: tome"))
    result = cli("validate", *ws.args())
    assert result.code == 1 and "reference: no module reference/tome.py" in result.err
    (ws.reference / "tome.py").write_text('class ToMe:\n    catalog_id = "tome"\n')
    assert cli("validate", *ws.args()).code == 0


def test_non_yaml_file_in_papers_is_not_silently_ignored(ws, cli):
    (ws.catalog / "papers" / "draft.yml").write_text("id: draft\n")
    result = cli("validate", *ws.args())
    assert result.code == 1 and "draft.yml:1: (file): not read" in result.err


def test_clean_catalog_prints_one_line_and_exits_0(ws, cli):
    result = cli("validate", *ws.args())
    assert result.code == 0
    assert result.out.count("\n") == 1 and "3 papers" in result.out


def test_module_and_entry_must_name_each_other(ws, cli):
    module = ws.reference / "tome.py"
    module.write_text('class ToMe:\n    catalog_id = "evit"\n', encoding="utf-8")
    path = ws.entry_path("tome")
    path.write_text(path.read_text(encoding="utf-8").replace("reference: null", "reference: tome"))
    result = cli("validate", *ws.args())
    assert result.code == 1
    assert "reference: reference/tome.py declares no class with catalog_id = 'tome'" in result.err
    assert f"{module}:2: catalog_id: catalog/papers/evit.yaml should say `reference: tome`" in (
        result.err
    )
