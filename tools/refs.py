"""Cross-links between catalog entries and ``reference/`` modules.

``validate`` reads the modules statically (``ast``), so it needs no torch and
stays fast: a module names its paper with a class attribute ``catalog_id =
"<id>"``; an entry names its module with ``reference: <module>``. Both
directions must agree.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import TYPE_CHECKING

from tools.problems import Problem

if TYPE_CHECKING:
    from tools.entry import Entry

# Modules of the reference package that serve every method (contract, registry, hosts).
INFRASTRUCTURE = frozenset(
    {
        "__init__",
        "core",
        "registry",
        "hosts",
        "adapters",
        "bench",
        "ops",
        "projector",
        "attach",
        "baselines",
    }
)


def declared_ids(path: Path) -> list[tuple[str, int]]:
    """``(catalog_id, line)`` for every ``catalog_id = "..."`` class attribute in a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if (
                isinstance(stmt, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "catalog_id" for t in stmt.targets)
                and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
                and stmt.value.value
            ):
                found.append((stmt.value.value, stmt.lineno))
    return found


def check_references(
    entries: list[Entry], reference_dir: Path, unreadable: set[str] = frozenset()
) -> list[Problem]:
    """Both directions agree; ids in ``unreadable`` (entries that failed to load) are skipped."""
    problems: list[Problem] = []
    by_id = {entry.paper.id: entry for entry in entries}
    modules: dict[str, list[tuple[str, int]]] = {}
    if reference_dir.is_dir():
        for path in sorted(reference_dir.glob("*.py")):
            if path.stem not in INFRASTRUCTURE:
                try:
                    modules[path.stem] = declared_ids(path)
                except SyntaxError as exc:
                    problems.append(Problem(path, exc.lineno or 1, "", f"not Python: {exc.msg}"))
    for entry in entries:
        module = entry.paper.reference
        if module is None or module not in modules:
            continue  # a missing module is reported by check_entry
        if entry.paper.id not in [cid for cid, _ in modules[module]]:
            problems.append(
                Problem(
                    entry.path,
                    entry.line("reference"),
                    "reference",
                    f"reference/{module}.py declares no class with catalog_id = {entry.paper.id!r}",
                )
            )
    for module, declared in modules.items():
        path = reference_dir / f"{module}.py"
        for catalog_id, line in declared:
            entry = by_id.get(catalog_id)
            if catalog_id in unreadable:
                continue
            if entry is None:
                problems.append(
                    Problem(path, line, "catalog_id", f"{catalog_id!r} is not a catalog entry")
                )
            elif entry.paper.reference != module:
                problems.append(
                    Problem(
                        path,
                        line,
                        "catalog_id",
                        f"catalog/papers/{catalog_id}.yaml should say `reference: {module}`",
                    )
                )
    return problems
