"""One catalog entry as the tools see it: the validated paper, its file and its lines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tools.schema import PaperBase
from tools.yaml_lines import LocatedYaml


@dataclass(frozen=True)
class Entry:
    """A validated paper with the file it came from and the line of each field."""

    paper: PaperBase
    path: Path
    located: LocatedYaml

    def line(self, *field: str | int) -> int:
        return self.located.line_of(tuple(field))
