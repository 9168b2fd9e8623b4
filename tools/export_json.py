"""The whole catalog as one JSON document."""

from __future__ import annotations

import json

from tools.loader import Catalog
from tools.schema import FIELD_ORDER, PaperBase


def paper_record(paper: PaperBase) -> dict:
    """One entry as plain JSON types, keys in the catalog's field order."""
    data = paper.model_dump(mode="json")
    return {key: data[key] for key in FIELD_ORDER}


def render_json(catalog: Catalog) -> str:
    document = {
        "$comment": "Generated from catalog/ by `python -m tools export --format json`.",
        "count": len(catalog.entries),
        "taxonomy": {
            facet: catalog.taxonomy.facet(facet)
            for facet in ("target", "modality", "stage", "mechanism", "training")
        },
        "papers": [paper_record(p) for p in catalog.papers],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
