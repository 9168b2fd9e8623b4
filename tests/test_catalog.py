"""The real catalog: complete against the original list, valid, and rendered."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from tools import paths
from tools.loader import load_catalog
from tools.render_readme import render_readme

ORIGINAL_LIST = Path(__file__).parent / "data" / "original_list.md"


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def original_papers() -> list[tuple[str, str]]:
    """(kind, id) of every paper of the original list: its arXiv or OpenReview id."""
    found = []
    for line in ORIGINAL_LIST.read_text(encoding="utf-8").splitlines():
        if m := re.search(r"\]\(https://arxiv\.org/(?:abs|pdf)/(\d{4}\.\d{4,5})", line):
            found.append(("arxiv", m.group(1)))
        elif m := re.search(r"openreview\.net/pdf\?id=([\w-]+)", line):
            found.append(("openreview", m.group(1)))
    return found


def test_original_list_has_65_papers():
    assert len(original_papers()) == 65


@pytest.mark.parametrize("kind,ident", original_papers(), ids=lambda v: str(v))
def test_every_original_paper_has_an_entry_and_a_readme_line(catalog, kind, ident):
    matches = [p for p in catalog.papers if getattr(p, kind) == ident]
    # A later version that is another paper has its own entry (VisPruner, v2 of FasterVLM).
    matches = [p for p in matches if not re.search(r"v([2-9]|[1-9][0-9])$", p.links.abstract)]
    assert len(matches) == 1, f"{kind} {ident} is not in catalog/"
    readme = paths.README.read_text(encoding="utf-8")
    assert f"]({matches[0].links.abstract})" in readme


def test_readme_is_fresh(catalog):
    readme = paths.README.read_text(encoding="utf-8")
    assert render_readme(readme, catalog) == readme, "run `python -m tools build`"


def test_committed_json_schema_is_fresh(catalog):
    from tools.json_schema import render_json_schema

    committed = (paths.CATALOG / paths.SCHEMA_FILENAME).read_text(encoding="utf-8")
    assert committed == render_json_schema(catalog.taxonomy), "run `python -m tools build`"


def test_json_schema_accepts_every_entry_and_rejects_bad_ones(catalog):
    """Editors validate with the JSON Schema; it must agree with the pydantic schema."""
    schema = json.loads((paths.CATALOG / paths.SCHEMA_FILENAME).read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    for entry in catalog.entries:
        data = yaml.safe_load(entry.path.read_text(encoding="utf-8"))
        data["added"] = data["added"].isoformat()  # YAML language servers see a string
        assert not list(validator.iter_errors(data)), entry.path
    bad = dict(data, mechanism=["prunning"], colour="red")
    messages = " ".join(e.message for e in validator.iter_errors(bad))
    assert "prunning" in messages and "colour" in messages


def test_every_entry_points_editors_at_the_schema(catalog):
    for entry in catalog.entries:
        first = entry.path.read_text(encoding="utf-8").splitlines()[0]
        assert first == "# yaml-language-server: $schema=../paper.schema.json", entry.path


def test_entries_keep_the_documented_key_order(catalog):
    from tools.schema import FIELD_ORDER

    for entry in catalog.entries:
        keys = list(yaml.safe_load(entry.path.read_text(encoding="utf-8")))
        assert keys == [k for k in FIELD_ORDER if k in keys], entry.path


def test_every_taxonomy_term_is_described(catalog):
    for facet in ("target", "modality", "stage", "mechanism", "training"):
        for term, description in catalog.taxonomy.facet(facet).items():
            assert description.endswith("."), (facet, term)
