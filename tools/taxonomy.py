"""The controlled vocabulary (``catalog/taxonomy.yaml``): every enum of the schema."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tools.files import DOCUMENT_LIMIT, read_text
from tools.text import plain_text_problem
from tools.yaml_lines import load_located

FACETS = ("target", "modality", "stage", "mechanism", "training", "venues", "journals", "orgs")


@dataclass(frozen=True, eq=False)
class Taxonomy:
    """Each facet maps a term to its one-line description, in file order."""

    target: dict[str, str]
    modality: dict[str, str]
    stage: dict[str, str]
    mechanism: dict[str, str]
    training: dict[str, str]
    venues: dict[str, str]
    journals: dict[str, str]
    orgs: dict[str, str]

    @property
    def venue_series(self) -> dict[str, str]:
        """Conference and journal series together."""
        return {**self.venues, **self.journals}

    def facet(self, name: str) -> dict[str, str]:
        return getattr(self, name)


# Facets whose terms are identifiers (used in URLs, anchors and data attributes);
# the others (venue series, organisations) are names, held to the plain-text rules.
IDENTIFIER_FACETS = ("target", "modality", "stage", "mechanism", "training")
_IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9]*(-[A-Za-z0-9]+)*$")


class TaxonomyError(ValueError):
    """The taxonomy file itself is unusable: ``problems`` are ``(line, field, message)``."""

    def __init__(self, problems: list[tuple[int, str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"line {line}: {field}: {msg}" for line, field, msg in problems))


def _term_problem(facet: str, term: object) -> str | None:
    if not isinstance(term, str):
        return f"a term must be text; YAML read {term!r} as a {type(term).__name__}"
    if facet in IDENTIFIER_FACETS:
        if not _IDENTIFIER.fullmatch(term):
            return f"{term!r}: a term is letters and digits joined by single hyphens"
        return None
    return plain_text_problem(term)


def load_taxonomy(path: Path) -> Taxonomy:
    """Read and check ``taxonomy.yaml``; raise TaxonomyError with every problem and its line."""
    try:
        located = load_located(read_text(path, DOCUMENT_LIMIT))
    except ValueError as exc:  # UnreadableFile or YamlSyntaxError
        raise TaxonomyError([(getattr(exc, "line", 1), "", str(exc))]) from exc
    data = located.data
    if not isinstance(data, dict):
        raise TaxonomyError([(1, "", "expected a mapping of facets")])
    problems = [
        (line, ".".join(map(str, loc)), "defined twice; YAML would keep only the last one")
        for loc, line in located.duplicate_keys
    ]
    problems += [
        (located.line_of((name,)), str(name), "unknown facet; facets: " + ", ".join(FACETS))
        for name in data
        if name not in FACETS
    ]
    facets: dict[str, dict[str, str]] = {}
    for name in FACETS:
        terms = data.get(name)
        if not isinstance(terms, dict) or not terms:
            problems.append(
                (located.line_of((name,)), name, "expected a non-empty mapping term -> description")
            )
            continue
        for term, description in terms.items():
            line = located.line_of((name, term))
            problem = _term_problem(name, term)
            if problem:
                problems.append((line, f"{name}.{term}", problem))
            elif not isinstance(description, str) or not description.strip():
                problems.append((line, f"{name}.{term}", "needs a one-line description"))
            elif problem := plain_text_problem(" ".join(description.split())):
                problems.append((line, f"{name}.{term}", f"description {problem}"))
        facets[name] = {
            str(term): " ".join(str(description).split()) for term, description in terms.items()
        }
    for term in set(facets.get("venues", {})) & set(facets.get("journals", {})):
        problems.append(
            (located.line_of(("journals", term)), f"journals.{term}", "also listed under venues")
        )
    if problems:
        raise TaxonomyError(sorted(problems))
    return Taxonomy(**facets)
