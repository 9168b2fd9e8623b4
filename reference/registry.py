"""One registry of reference implementations, keyed by catalog id (timm's pattern)."""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from torch import nn

# Modules of the package that are infrastructure, not papers.
INFRASTRUCTURE = frozenset(
    {
        "core",
        "registry",
        "hosts",
        "ops",
        "bench",
        "projector",
        "attach",
        "adapters",
    }
)
_REGISTRY: dict[str, type] = {}  # TokenReducer, LLMReducer or Projector classes


@dataclass(frozen=True)
class Entry:
    catalog_id: str
    module: str
    kind: str
    cls: type


def register(cls: type) -> type:
    """Class decorator; refuses a second class for the same catalog id."""
    key = cls.catalog_id
    if not key:
        raise ValueError(f"{cls.__qualname__} has no catalog_id")
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise ValueError(f"{key!r} is already registered by {_REGISTRY[key].__module__}")
    _REGISTRY[key] = cls
    return cls


def _import_all() -> None:
    package = str(Path(__file__).parent)  # this package's folder: every module in it
    for info in pkgutil.iter_modules([package]):
        if info.name not in INFRASTRUCTURE and not info.name.startswith("_"):
            importlib.import_module(f"reference.{info.name}")


def entries(pattern: str = "*") -> list[Entry]:
    """Registered methods whose catalog id matches ``pattern`` (shell wildcards)."""
    _import_all()
    return [
        Entry(key, cls.__module__.removeprefix("reference."), cls.kind, cls)
        for key, cls in sorted(_REGISTRY.items())
        if fnmatch.fnmatchcase(key, pattern)
    ]


def get(catalog_id: str) -> type:
    """The registered class of ``catalog_id``; a ValueError when there is none."""
    _import_all()
    if catalog_id not in _REGISTRY:
        raise ValueError(f"no reference implementation for {catalog_id!r}")
    return _REGISTRY[catalog_id]


def create(catalog_id: str, **kwargs) -> nn.Module:
    _import_all()
    if catalog_id not in _REGISTRY:
        raise KeyError(f"no reference implementation for {catalog_id!r}")
    return _REGISTRY[catalog_id](**kwargs)
