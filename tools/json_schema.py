"""JSON Schema of an entry, for editors that validate YAML as people type."""

from __future__ import annotations

import json

from tools.schema import paper_model
from tools.taxonomy import Taxonomy


def render_json_schema(taxonomy: Taxonomy) -> str:
    schema = paper_model(taxonomy).model_json_schema()
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated from tools/schema.py and catalog/taxonomy.yaml by "
        "`python -m tools build`; do not edit.",
        **schema,
        "title": "Awesome Token Compress paper entry",
    }
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
