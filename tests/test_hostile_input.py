"""Hostile and broken catalog input: one clear problem per fault, every fault at once,
exit 1, never a traceback, and nothing written."""

from __future__ import annotations

import os
import re
import stat
import time

import pytest

TOME_TITLE = 'title: "Token Merging: Your ViT But Faster"'


def edit(ws, paper_id: str, old: str, new: str) -> None:
    path = ws.entry_path(paper_id)
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {paper_id}.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def problems(result) -> list[str]:
    """The ``path:line: field: message`` lines of a failed run."""
    assert result.code == 1, result.out
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert lines[-1].endswith("nothing was written"), lines[-1]
    return lines[:-1]


def only_problem(result, file: str, field: str, words: str) -> str:
    pattern = rf"^\S*{re.escape(file)}:\d+: {re.escape(field)}: .*{words}"
    everything = problems(result)
    found = [line for line in everything if re.match(pattern, line)]
    assert len(found) == 1, everything
    return found[0]


def line_no(problem: str) -> int:
    return int(problem.split(":")[1])


# -- strings that would reach the README, the site or the feed ------------------------

HOSTILE_STRINGS = [
    ("control-char", TOME_TITLE, 'title: "Token\\x01Merging"', "title", "U\\+0001"),
    ("nul", TOME_TITLE, 'title: "Token\\0Merging"', "title", "U\\+0000"),
    ("escape", TOME_TITLE, 'title: "Token \\e[31mMerging"', "title", "U\\+001B"),
    ("bidi-override", "name: ToMe", 'name: "To\\u202eMe"', "name", "U\\+202E"),
    (
        "url-breaks-out-of-markdown",
        "code: https://github.com/facebookresearch/ToMe",
        'code: "https://github.com/a)[Click](javascript:alert(1))"',
        "links.code",
        "may not carry",
    ),
    (
        "url-trailing-newline",
        "code: https://github.com/facebookresearch/ToMe",
        'code: "https://github.com/facebookresearch/ToMe\\n"',
        "links.code",
        "may not carry",
    ),
    (
        "javascript-url",
        "code: https://github.com/facebookresearch/ToMe",
        'code: "javascript:alert(1)"',
        "links.code",
        "not an http\\(s\\) URL",
    ),
    (
        "url-with-credentials",
        "code: https://github.com/facebookresearch/ToMe",
        'code: "https://github.com@evil.example/x"',
        "links.code",
        "user name",
    ),
    (
        "non-ascii-arxiv-digits",
        'arxiv: "2210.09461"',
        'arxiv: "２２１０.０９４６１"',
        "arxiv",
        "does not match",
    ),
    ("old-release", 'released: "2022-10"', 'released: "1900-01"', "released", "before 2017-06"),
    ("future-release", 'released: "2022-10"', 'released: "2099-01"', "released", "in the future"),
    ("reference-core", "reference: null", "reference: core", "reference", "infrastructure"),
    ("reference-registry", "reference: null", "reference: registry", "reference", "infrastructure"),
]


@pytest.mark.parametrize("case", HOSTILE_STRINGS, ids=[c[0] for c in HOSTILE_STRINGS])
def test_hostile_string_is_refused_at_its_line(ws, cli, case):
    _, old, new, field, words = case
    edit(ws, "tome", old, new)
    before = ws.snapshot()
    result = cli("build", *ws.args("--readme", str(ws.readme)))
    problem = only_problem(result, "tome.yaml", field, words)
    text = ws.entry_path("tome").read_text(encoding="utf-8").splitlines()
    assert new.split(":")[0].strip() in text[line_no(problem) - 1]
    assert ws.snapshot() == before


def test_taxonomy_terms_and_organisations_obey_the_plain_text_rules(ws, cli):
    taxonomy = ws.catalog / "taxonomy.yaml"
    text = taxonomy.read_text(encoding="utf-8")
    text = text.replace(
        "  pruning: Drops", "  x onmouseover=alert(1): Sneaky.\n  pruning: Drops", 1
    ).replace("  Apple: Apple.", "  <img src=x onerror=alert(1)>: An image.\n  Apple: Apple.", 1)
    taxonomy.write_text(text, encoding="utf-8")
    before = ws.snapshot()
    found = problems(cli("build", *ws.args("--readme", str(ws.readme))))
    lines = text.splitlines()
    term = [p for p in found if "mechanism.x onmouseover" in p]
    org = [p for p in found if "orgs.<img" in p]
    assert len(term) == 1 and "letters and digits" in term[0]
    assert len(org) == 1 and "HTML tag" in org[0]
    assert "onmouseover" in lines[line_no(term[0]) - 1]
    assert "<img" in lines[line_no(org[0]) - 1]
    assert ws.snapshot() == before


def test_a_term_defined_twice_in_the_taxonomy_is_reported(ws, cli):
    taxonomy = ws.catalog / "taxonomy.yaml"
    text = taxonomy.read_text(encoding="utf-8")
    taxonomy.write_text(
        text.replace("  pooling: Fixed", "  pruning: Again.\n  pooling: Fixed", 1), encoding="utf-8"
    )
    found = problems(cli("validate", *ws.args()))
    assert any("taxonomy.yaml:" in p and "mechanism.pruning: defined twice" in p for p in found)


def test_a_broken_taxonomy_does_not_hide_the_entries_problems(ws, cli):
    taxonomy = ws.catalog / "taxonomy.yaml"
    taxonomy.write_text(taxonomy.read_text(encoding="utf-8") + "colours: {red: Red.}\n")
    ws.entry_path("evit").write_text("title: [unclosed\n", encoding="utf-8")
    found = problems(cli("validate", *ws.args()))
    assert any("taxonomy.yaml:" in p and "colours: unknown facet" in p for p in found)
    assert any(re.search(r"evit\.yaml:\d+: \(file\): invalid YAML", p) for p in found)


def test_duplicate_titles_and_short_names_are_reported(ws, cli):
    evit = ws.load_entry("evit")
    tome = ws.load_entry("tome")
    edit(ws, "evit", f"name: {evit['name']}", "name: tome")
    edit(ws, "evit", f'title: "{evit["title"]}"', f'title: "{tome["title"].upper()}"')
    found = problems(cli("validate", *ws.args()))
    # Reported once, on the later file, naming the earlier one.
    assert [p.split(": ", 1)[1] for p in found] == [
        "name: the short name 'ToMe' is also used by evit.yaml",
        "title: the title 'Token Merging: Your ViT But Faster' is also used by evit.yaml",
    ]


# -- files that are not what they seem ------------------------------------------------


ALIAS_BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)

BROKEN_FILES = [
    ("alias-bomb", ALIAS_BOMB, "(file)", "aliases"),
    ("deep-nesting", "x: " + "[" * 990 + "]" * 990 + "\n", "(file)", "nested more than"),
    ("bad-int-tag", 'id: !!int "abc"\n', "(file)", "cannot read int value"),
    ("huge-int", "id: " + "9" * 5000 + "\n", "(file)", "cannot read int value"),
    ("timestamp-tag", "added: !!timestamp garbage\n", "added", "valid date"),
    ("impossible-date", "added: 2024-02-30\n", "added", "day value is outside"),
    ("python-tag", "id: !!python/object/apply:os.system [ls]\n", "(file)", "constructor"),
    ("complex-key", "? [a, b]\n: c\n", "(file)", "plain name"),
    ("not-utf8", b"id: \xff\xfe\n", "(file)", "not UTF-8"),
    ("oversized", "notes:\n" + "  - " + "word " * 20_000 + "\n", "(file)", "the limit is"),
]


@pytest.mark.parametrize("case", BROKEN_FILES, ids=[c[0] for c in BROKEN_FILES])
def test_broken_file_is_one_located_problem_and_the_rest_is_still_checked(ws, cli, case):
    _, content, field, words = case
    path = ws.entry_path("evit")
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        # Keep the rest of a real entry so that only the broken part is reported.
        if field == "(file)":
            path.write_text(content, encoding="utf-8")
        else:
            key = content.split(":")[0]
            text = path.read_text(encoding="utf-8")
            path.write_text(re.sub(rf"(?m)^{key}: .*\n", content, text), encoding="utf-8")
    edit(ws, "tome", "mechanism: [merging]", "mechanism: [mergeing]")
    start = time.perf_counter()
    result = cli("validate", *ws.args())
    assert time.perf_counter() - start < 5
    only_problem(result, "evit.yaml", field, words)
    only_problem(result, "tome.yaml", "mechanism[0]", "Input should be")


SPECIAL_FILES = {
    "dev-zero": (lambda p: p.symlink_to("/dev/zero"), "character device"),
    "fifo": (lambda p: os.mkfifo(p), "FIFO"),
    "broken-link": (lambda p: p.symlink_to(p.parent / "nowhere.yaml"), "does not exist"),
    "link-loop": (lambda p: p.symlink_to(p), "symbolic link loop"),
    "subfolder": (lambda p: p.with_suffix("").mkdir(), "a directory"),
    "dot-file": (lambda p: p.with_name(".hidden.yaml").write_text("id: x\n"), "hidden file"),
}


@pytest.mark.parametrize("kind", list(SPECIAL_FILES))
def test_special_file_in_papers_is_refused_without_hanging(ws, cli, kind):
    make, words = SPECIAL_FILES[kind]
    make(ws.catalog / "papers" / "odd.yaml")
    start = time.perf_counter()
    found = problems(cli("validate", *ws.args()))
    assert time.perf_counter() - start < 5
    assert len(found) == 1 and ": (file): not read: " in found[0] and words in found[0], found


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_entry_is_a_problem(ws, cli):
    ws.entry_path("evit").chmod(0)
    found = problems(cli("validate", *ws.args()))
    assert any("evit.yaml:1: (file): not read: permission denied" in p for p in found)


# -- what the commands write ----------------------------------------------------------


def test_new_refuses_an_id_that_would_leave_papers(ws, cli, tmp_path):
    for bad in ("../../../x", "Bad Id!", "a/b", ""):
        before = ws.snapshot()
        result = cli("new", "--arxiv", "2401.00001", "--offline", "--id", bad, *ws.args())
        assert result.code == 1 and "is not a catalog id" in result.err
        assert ws.snapshot() == before
    assert not (tmp_path.parent / "x.yaml").exists()


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_export_never_replaces_a_device_or_a_directory(ws, cli, tmp_path):
    result = cli("export", "--format", "json", "-o", "/dev/null", *ws.args())
    assert result.code == 1 and "character device" in result.err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    result = cli("export", "--format", "json", "-o", str(tmp_path), *ws.args())
    assert result.code == 1 and "is a directory" in result.err and "Traceback" not in result.err


def test_export_through_a_symlink_writes_the_file_it_points_at(ws, cli, tmp_path):
    target = tmp_path / "catalog.json"
    target.write_text("old\n")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert cli("export", "--format", "json", "-o", str(link), *ws.args()).code == 0
    assert link.is_symlink() and target.read_text().startswith("{")


def test_build_writes_all_files_or_none(ws, cli):
    schema = ws.catalog / "paper.schema.json"
    schema.write_text("{}\n")  # stale: build would rewrite it
    ws.readme.chmod(0o444)
    before = ws.snapshot()
    result = cli("build", *ws.args("--readme", str(ws.readme)))
    assert result.code == 1 and "read-only" in result.err
    assert ws.snapshot() == before
    ws.readme.chmod(0o644)
    assert cli("build", *ws.args("--readme", str(ws.readme))).code == 0
    assert schema.read_text() != "{}\n"


def test_crlf_readme_keeps_its_line_endings_and_check_tells_the_truth(ws, cli):
    args = ws.args("--readme", str(ws.readme))
    assert cli("render", *args).code == 0
    ws.readme.write_bytes(ws.readme.read_bytes().replace(b"\n", b"\r\n"))
    assert cli("render", "--check", *args).code == 0  # only the line endings differ: fresh
    edit(ws, "tome", "venue: ICLR 2023", "venue: ICLR 2024")
    assert cli("render", "--check", *args).code == 1
    assert cli("render", *args).code == 0
    data = ws.readme.read_bytes()
    assert b"ICLR 2024" in data and data.count(b"\r\n") == data.count(b"\n")
