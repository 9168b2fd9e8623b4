"""Site pages for ``reference/``: the contract, one page per module, timing plots.

Modules are read statically (``ast``), so building the site needs no torch.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tools.refs import INFRASTRUCTURE


@dataclass(frozen=True)
class Module:
    name: str
    catalog_id: str
    kind: str
    where: str
    needs: tuple[str, ...]
    basis: str
    docstring: str
    source: str


_LIST_ITEM = re.compile(r"^\s*(\d+\.|[-*])\s")


def _markdown(docstring: str) -> str:
    """Docstrings use reST double backticks, and lists without a blank line before them."""
    out: list[str] = []
    for line in docstring.replace("``", "`").splitlines():
        starts_list = _LIST_ITEM.match(line) and out and out[-1].strip()
        if starts_list and not _LIST_ITEM.match(out[-1]) and not out[-1].startswith(" "):
            out.append("")
        out.append(line)
    return "\n".join(out)


def describe_setting(setting: dict[str, dict]) -> str:
    """``{"0": {"r": 13}, ...}`` -> ``r=13 at blocks 0-11`` (blocks counted from 0)."""
    groups: dict[str, list[int]] = {}
    for layer, kwargs in setting.items():
        key = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"
        groups.setdefault(key, []).append(int(layer))
    parts = []
    for key, layers in groups.items():
        layers.sort()
        span = (
            f"{layers[0]}-{layers[-1]}"
            if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2
            else ", ".join(map(str, layers))
        )
        parts.append(f"{key} at block{'s' if len(layers) > 1 else ''} {span}")
    return "; ".join(parts)


def _class_attrs(tree: ast.Module) -> dict[str, object]:
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            attrs = {}
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                    value = stmt.value
                    if isinstance(value, ast.Call) and value.args:  # frozenset({...})
                        value = value.args[0]
                    with contextlib.suppress(ValueError):
                        attrs[stmt.targets[0].id] = ast.literal_eval(value)
            if "catalog_id" in attrs:
                bases = {getattr(b, "id", "") for b in node.bases}
                attrs.setdefault("where", "llm" if "LLMReducer" in bases else "mid")
                return attrs
    return {}


def read_modules(reference_dir: Path) -> list[Module]:
    modules = []
    for path in sorted(reference_dir.glob("*.py")):
        if path.stem in INFRASTRUCTURE:
            continue
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        attrs = _class_attrs(tree)
        if not attrs:
            continue
        modules.append(
            Module(
                name=path.stem,
                catalog_id=attrs["catalog_id"],
                kind=str(attrs.get("kind", "")),
                where=str(attrs.get("where", "mid")),
                needs=tuple(sorted(attrs.get("needs", ()))),
                basis=str(attrs.get("basis", "official code")),
                docstring=_markdown(ast.get_docstring(tree) or ""),
                source=source,
            )
        )
    return modules


def package_docstring(reference_dir: Path) -> str:
    tree = ast.parse((reference_dir / "__init__.py").read_text(encoding="utf-8"))
    return _markdown(ast.get_docstring(tree) or "")


def load_results(bench_dir: Path, stem: str = "reference") -> dict[str, dict]:
    """Timing results (``reference-*.json`` or ``vlm-*.json``) by device type."""
    results = {}
    for path in sorted(bench_dir.glob(f"{stem}-*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        results[data["device"]["type"]] = data
    return results


def _speedup_bars(result: dict, config_of, label_of, value_key: str, xlabel: str) -> bytes:
    """Horizontal bars: one group per method, one bar per configuration; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    methods = sorted({r["method"] for r in rows})
    configs = sorted({config_of(r) for r in rows})
    fig, ax = plt.subplots(figsize=(10, 0.12 * len(methods) * len(configs) + 1.8), dpi=100)
    height = 0.8 / max(1, len(configs))
    for i, config in enumerate(configs):
        values = {r["method"]: r[value_key] for r in rows if config_of(r) == config}
        ys = [m + i * height for m in range(len(methods))]
        ax.barh(ys, [values.get(m, 0) for m in methods], height=height, label=label_of(config))
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([m + 0.4 - height / 2 for m in range(len(methods))], methods)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(
        f"{result['device']['type'].upper()} ({result['device']['name']}), "
        f"torch {result['versions']['torch']}, {result['date'][:10]}"
    )
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def speedup_plot(result: dict) -> bytes:
    """ViT host: speedup of each method per model and batch."""
    return _speedup_bars(
        result,
        lambda r: (r["model"], r["batch"]),
        lambda c: f"{re.sub(r'_patch16_224$', '', c[0])}, batch {c[1]}",
        "speedup",
        "speedup of the host's forward (dense time / reduced time)",
    )


def vlm_plot(result: dict) -> bytes:
    """LLaVA host: prefill speedup of each method per visual-token budget and batch."""
    total = result["results"][0]["visual_tokens"] if result["results"] else 0
    return _speedup_bars(
        result,
        lambda r: (r["batch"], r["keep"]),
        lambda c: f"keep {c[1]}/{total}, batch {c[0]}",
        "prefill_speedup",
        "prefill speedup (all visual tokens / pruned)",
    )
