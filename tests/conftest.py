"""Shared fixtures: a small throw-away catalog and a CLI runner."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tools import paths
from tools.cli import main

SAMPLE_IDS = ("tome", "evit", "fastv")


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    def run(*args: str) -> Result:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@dataclass
class Workspace:
    """A copy of the taxonomy, a few real entries and a README, in a temp dir."""

    root: Path

    @property
    def catalog(self) -> Path:
        return self.root / "catalog"

    @property
    def readme(self) -> Path:
        return self.root / "README.md"

    @property
    def reference(self) -> Path:
        return self.root / "reference"

    def entry_path(self, paper_id: str) -> Path:
        return self.catalog / "papers" / f"{paper_id}.yaml"

    def load_entry(self, paper_id: str) -> dict:
        return yaml.safe_load(self.entry_path(paper_id).read_text(encoding="utf-8"))

    def write_entry(self, paper_id: str, data: dict | str) -> Path:
        path = self.entry_path(paper_id)
        text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    def args(self, *extra: str) -> list[str]:
        return ["--catalog", str(self.catalog), "--reference", str(self.reference), *extra]

    def snapshot(self) -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in sorted(self.root.rglob("*")) if p.is_file()}


@pytest.fixture
def ws(tmp_path) -> Workspace:
    work = Workspace(tmp_path)
    (work.catalog / "papers").mkdir(parents=True)
    work.reference.mkdir()
    shutil.copy(paths.CATALOG / "taxonomy.yaml", work.catalog / "taxonomy.yaml")
    for paper_id in SAMPLE_IDS:
        text = (paths.CATALOG / "papers" / f"{paper_id}.yaml").read_text(encoding="utf-8")
        # The workspace has no reference modules: unlink the entries from them.
        text = re.sub(r"(?m)^reference: .*$", "reference: null", text)
        work.entry_path(paper_id).write_text(text, encoding="utf-8")
    shutil.copy(paths.README, work.readme)
    return work
