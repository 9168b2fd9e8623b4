"""Read ``catalog/`` into validated ``Paper`` objects, or every problem at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from tools import paths
from tools.problems import CatalogInvalid, Problem
from tools.schema import Erratum, Links, PaperBase, paper_model
from tools.taxonomy import Taxonomy, TaxonomyError, load_taxonomy
from tools.yaml_lines import LocatedYaml, YamlSyntaxError, load_located


@dataclass(frozen=True)
class Entry:
    """A validated paper with the file it came from and the line of each field."""

    paper: PaperBase
    path: Path
    located: LocatedYaml

    def line(self, *field: str | int) -> int:
        return self.located.line_of(tuple(field))


@dataclass(frozen=True)
class Catalog:
    root: Path
    taxonomy: Taxonomy
    entries: tuple[Entry, ...]
    reference_dir: Path = paths.REFERENCE

    @property
    def papers(self) -> list[PaperBase]:
        """Newest first, then by name: the order of every listing."""
        return [entry.paper for entry in self.entries]


def format_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(error: dict, allowed_keys: list[str]) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return f"unknown key; allowed keys: {', '.join(allowed_keys)}"
    if kind == "string_type" and isinstance(value, int | float | bool):
        return f"must be a quoted string; YAML read {value!r} as a {type(value).__name__}"
    if kind == "string_pattern_mismatch":
        return f"{value!r} does not match the expected form {error['ctx']['pattern']}"
    message = error["msg"]
    return message.removeprefix("Value error, ")


def _schema_problems(
    path: Path, located: LocatedYaml, error: ValidationError, model: type[PaperBase]
) -> list[Problem]:
    problems = []
    for item in error.errors():
        loc = tuple(part for part in item["loc"] if not str(part).startswith("function-"))
        allowed = list(model.model_fields)
        if len(loc) > 1 and loc[0] in ("links", "errata"):
            sub = Links if loc[0] == "links" else Erratum
            allowed = list(sub.model_fields)
        problems.append(
            Problem(path, located.line_of(loc), format_loc(loc), _message(item, allowed))
        )
    return problems


def _read_entry(path: Path, model: type[PaperBase]) -> tuple[Entry | None, list[Problem]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return None, [Problem(path, 1, "", f"not UTF-8 text ({exc.reason})")]
    try:
        located = load_located(text)
    except YamlSyntaxError as exc:
        return None, [Problem(path, exc.line, "", str(exc))]
    if not isinstance(located.data, dict):
        return None, [Problem(path, 1, "", "expected a mapping of fields (key: value)")]
    problems = [
        Problem(path, line, format_loc(loc), "duplicate key; YAML would keep only the last one")
        for loc, line in located.duplicate_keys
    ]
    try:
        paper = model.model_validate(located.data)
    except ValidationError as exc:
        return None, problems + _schema_problems(path, located, exc, model)
    return Entry(paper, path, located), problems


def load_catalog(root: Path = paths.CATALOG, reference_dir: Path = paths.REFERENCE) -> Catalog:
    """Load and check the whole catalog; raise CatalogInvalid listing every problem."""
    from tools.checks import check_catalog

    taxonomy_path = root / paths.TAXONOMY_FILENAME
    try:
        taxonomy = load_taxonomy(taxonomy_path)
    except TaxonomyError as exc:
        raise CatalogInvalid([Problem(taxonomy_path, 1, "", str(exc))]) from exc
    model = paper_model(taxonomy)
    papers_dir = root / paths.PAPERS_DIRNAME
    if not papers_dir.is_dir():
        raise CatalogInvalid([Problem(papers_dir, 1, "", "no papers/ directory in the catalog")])

    entries: list[Entry] = []
    problems: list[Problem] = []
    for path in sorted(papers_dir.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix != ".yaml":
            problems.append(Problem(path, 1, "", "not read: entries must be named <id>.yaml"))
            continue
        entry, found = _read_entry(path, model)
        problems += found
        if entry is not None:
            entries.append(entry)
    problems += check_catalog(entries, taxonomy, reference_dir)
    if problems:
        raise CatalogInvalid(problems)
    entries.sort(key=lambda e: (-int(e.paper.released.replace("-", "")), e.paper.name.lower()))
    return Catalog(root, taxonomy, tuple(entries), reference_dir)
