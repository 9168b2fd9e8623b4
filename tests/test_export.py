"""JSON and BibTeX exports of the whole catalog."""

from __future__ import annotations

import json

import pybtex.database

from tools.export_bibtex import latex_escape, render_entry
from tools.loader import load_catalog
from tools.schema import FIELD_ORDER


def test_json_export_round_trips_every_field(ws, cli):
    out = ws.root / "catalog.json"
    assert cli("export", "--format", "json", "-o", out, *ws.args()).code == 0
    document = json.loads(out.read_text(encoding="utf-8"))
    catalog = load_catalog(ws.catalog, ws.reference)
    assert document["count"] == len(catalog.papers) == len(document["papers"])
    for record, paper in zip(document["papers"], catalog.papers, strict=True):
        assert list(record) == FIELD_ORDER
        assert record["id"] == paper.id and record["authors"] == paper.authors
        assert record["added"] == paper.added.isoformat()


def test_bibtex_export_reads_back_with_a_real_parser(cli, tmp_path):
    """The real catalog: every entry parses, with its authors in order."""
    out = tmp_path / "papers.bib"
    assert cli("export", "--format", "bibtex", "-o", out).code == 0
    parsed = pybtex.database.parse_file(str(out), bib_format="bibtex")
    catalog = load_catalog()
    assert sorted(parsed.entries) == sorted(p.id for p in catalog.papers)
    for paper in catalog.papers:
        entry = parsed.entries[paper.id]
        assert entry.fields["year"].isdigit()
        assert entry.fields["url"] == paper.links.abstract
        if paper.authors:
            assert len(entry.persons["author"]) == len(paper.authors)


def test_bibtex_escapes_latex_specials(ws, tmp_path):
    catalog = load_catalog(ws.catalog, ws.reference)
    paper = catalog.papers[0].model_copy(
        update={"title": "Vote&Mix: 100% of {tokens} for $0 #1 a_b ~ ^"}
    )
    text = render_entry(paper, catalog.taxonomy)
    parsed = pybtex.database.parse_string(text, bib_format="bibtex")
    title = parsed.entries[paper.id].fields["title"]
    assert title == "{" + latex_escape(paper.title) + "}"
    assert r"Vote\&Mix: 100\% of \{tokens\} for \$0 \#1 a\_b" in title


def test_bibtex_entry_type_follows_the_venue(ws):
    catalog = load_catalog(ws.catalog, ws.reference)
    tome = next(p for p in catalog.papers if p.id == "tome")
    tax = catalog.taxonomy
    assert render_entry(tome, tax).startswith("@inproceedings{tome,")
    assert "booktitle = {ICLR 2023}" in render_entry(tome, tax)
    preprint = tome.model_copy(update={"venue": "arXiv"})
    assert render_entry(preprint, tax).startswith("@misc{tome,")
    assert "eprint = {2210.09461}" in render_entry(preprint, tax)
    journal = tome.model_copy(update={"venue": "TPAMI 2024"})
    assert render_entry(journal, tax).startswith("@article{tome,")
    assert "journal = {TPAMI}" in render_entry(journal, tax)


def test_export_to_stdout(ws, cli):
    result = cli("export", "--format", "json", *ws.args())
    assert result.code == 0 and json.loads(result.out)["count"] == 3
