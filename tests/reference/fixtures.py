"""Load golden fixtures: inputs and outputs of a method's official code, stored as JSON.

Each ``tests/reference/fixtures/<id>.json`` records the official ``repo``, ``commit`` and
``file`` it was produced from and how; tensors are nested lists rounded to 7 significant digits.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"


@cache
def load(name: str) -> dict:
    """The fixture ``fixtures/<name>.json``; it must say where it came from."""
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    for key in ("repo", "commit", "file"):
        assert data.get(key), f"fixture {name} does not record its {key}"
    return data


def tensor(value, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A nested list from a fixture as a tensor."""
    return torch.tensor(value, dtype=dtype)
