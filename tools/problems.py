"""A problem found in the catalog, printed as ``path:line: field: message``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, order=True)
class Problem:
    path: Path
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{_display(self.path)}:{self.line}: {self.field or '(file)'}: {self.message}"


def _display(path: Path) -> str:
    """Relative to the working directory when below it: shorter, and clickable in editors."""
    # abspath, not resolve(): show the name the contributor sees, even for a broken
    # link or a link loop.
    try:
        return os.path.relpath(os.path.abspath(path)) if _below_cwd(path) else str(path)
    except ValueError:
        return str(path)


def _below_cwd(path: Path) -> bool:
    cwd = os.getcwd()
    return os.path.abspath(path).startswith(cwd.rstrip(os.sep) + os.sep)


class CatalogInvalid(Exception):
    """Raised with every problem at once; nothing may be written."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems)
        super().__init__(f"{len(self.problems)} problem(s) in the catalog")
