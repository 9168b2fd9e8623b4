"""The controlled vocabulary (``catalog/taxonomy.yaml``): every enum of the schema."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

FACETS = ("target", "modality", "stage", "mechanism", "training", "venues", "journals", "orgs")


class TaxonomyError(ValueError):
    """The taxonomy file itself is unusable."""


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


def load_taxonomy(path: Path) -> Taxonomy:
    """Read and check ``taxonomy.yaml``; raise TaxonomyError naming the file and facet."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TaxonomyError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise TaxonomyError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise TaxonomyError(f"{path}: expected a mapping of facets")
    unknown = sorted(set(data) - set(FACETS))
    if unknown:
        raise TaxonomyError(f"{path}: unknown facet(s) {', '.join(unknown)}")
    facets: dict[str, dict[str, str]] = {}
    for name in FACETS:
        terms = data.get(name)
        if not isinstance(terms, dict) or not terms:
            raise TaxonomyError(f"{path}: {name}: expected a non-empty mapping term -> description")
        for term, description in terms.items():
            if not isinstance(description, str) or not description.strip():
                raise TaxonomyError(f"{path}: {name}.{term}: needs a one-line description")
        facets[name] = {str(term): description.strip() for term, description in terms.items()}
    return Taxonomy(**facets)
