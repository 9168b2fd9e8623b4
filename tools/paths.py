"""Where things live in the repository."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "catalog"
PAPERS_DIRNAME = "papers"
TAXONOMY_FILENAME = "taxonomy.yaml"
SCHEMA_FILENAME = "paper.schema.json"
README = ROOT / "README.md"
REFERENCE = ROOT / "reference"
DOCS = ROOT / "docs"
CATALOG_BENCH = DOCS / "benchmarks" / "catalog-cpu.json"
