"""Read ``catalog/`` into validated ``Paper`` objects, or every problem at once."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from tools import paths
from tools.entry import Entry
from tools.files import ENTRY_LIMIT, UnreadableFile, describe_os_error, read_text
from tools.problems import CatalogInvalid, Problem
from tools.schema import Erratum, Links, PaperBase, paper_model
from tools.taxonomy import Taxonomy, TaxonomyError, load_taxonomy
from tools.yaml_lines import LocatedYaml, YamlSyntaxError, load_located


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


def _read_located(path: Path) -> tuple[LocatedYaml | None, list[Problem]]:
    """Parse one entry file: a regular UTF-8 file under the size cap, one YAML mapping."""
    try:
        located = load_located(read_text(path, ENTRY_LIMIT))
    except UnreadableFile as exc:
        return None, [Problem(path, 1, "", f"not read: {exc}")]
    except YamlSyntaxError as exc:
        return None, [Problem(path, exc.line, "", str(exc))]
    if not isinstance(located.data, dict):
        return None, [Problem(path, 1, "", "expected a mapping of fields (key: value)")]
    problems = [
        Problem(path, line, format_loc(loc), "duplicate key; YAML would keep only the last one")
        for loc, line in located.duplicate_keys
    ]
    return located, problems


def _read_entry(path: Path, model: type[PaperBase]) -> tuple[Entry | None, list[Problem]]:
    located, problems = _read_located(path)
    if located is None:
        return None, problems
    try:
        paper = model.model_validate(located.data)
    except ValidationError as exc:
        return None, problems + _schema_problems(path, located, exc, model)
    return Entry(paper, path, located), problems


def entry_files(papers_dir: Path) -> tuple[list[Path], list[Problem]]:
    """The ``<id>.yaml`` files of ``papers/``; anything else there is a problem, not skipped."""
    files, problems = [], []
    try:
        listing = sorted(papers_dir.iterdir())
    except OSError as exc:
        return [], [Problem(papers_dir, 1, "", f"not read: {describe_os_error(exc)}")]
    for path in listing:
        if path.name.startswith("."):
            reason = "a hidden file; entries are <id>.yaml files directly in papers/"
        elif path.is_dir():
            reason = "a directory; entries are <id>.yaml files directly in papers/"
        elif path.suffix != ".yaml":
            reason = "entries must be named <id>.yaml"
        else:
            files.append(path)
            continue
        problems.append(Problem(path, 1, "", f"not read: {reason}"))
    return files, problems


def load_catalog(root: Path = paths.CATALOG, reference_dir: Path = paths.REFERENCE) -> Catalog:
    """Load and check the whole catalog; raise CatalogInvalid listing every problem."""
    # Loading allocates many small objects that all stay alive (no cycles to collect), so
    # the cyclic collector's passes are pure cost: about 15% of validating 5,000 entries.
    paused = gc.isenabled()
    gc.disable()
    try:
        return _load_catalog(root, reference_dir)
    finally:
        if paused:
            gc.enable()


def _load_catalog(root: Path, reference_dir: Path) -> Catalog:
    from tools.checks import check_catalog

    problems: list[Problem] = []
    taxonomy_path = root / paths.TAXONOMY_FILENAME
    try:
        taxonomy = load_taxonomy(taxonomy_path)
    except TaxonomyError as exc:
        taxonomy = None
        problems += [Problem(taxonomy_path, line, f, msg) for line, f, msg in exc.problems]
    papers_dir = root / paths.PAPERS_DIRNAME
    if not papers_dir.is_dir():
        problems.append(Problem(papers_dir, 1, "", "no papers/ directory in the catalog"))
        raise CatalogInvalid(problems)

    files, found = entry_files(papers_dir)
    problems += found
    if taxonomy is None:
        # The enums are unknown, but every file can still be checked as YAML.
        for path in files:
            problems += _read_located(path)[1]
        raise CatalogInvalid(problems)
    model = paper_model(taxonomy)
    entries: list[Entry] = []
    for path in files:
        entry, found = _read_entry(path, model)
        problems += found
        if entry is not None:
            entries.append(entry)
    loaded = {entry.path for entry in entries}
    failed = {path.stem for path in files if path not in loaded}
    problems += check_catalog(entries, taxonomy, reference_dir, failed)
    if problems:
        raise CatalogInvalid(problems)
    entries.sort(key=lambda e: (-int(e.paper.released.replace("-", "")), e.paper.name.lower()))
    return Catalog(root, taxonomy, tuple(entries), reference_dir)
