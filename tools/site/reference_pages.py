"""Site pages for ``reference/``: the contract, one page per module, timing plots.

Modules are read statically (``ast``), so building the site needs no torch.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tools import paths
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
    # Provenance of the golden fixture the module's tests reproduce (repo, commit, file),
    # or None: ``tests/reference/fixtures/<module>.json`` beside the reference package.
    fixture: dict | None = None

    @property
    def provisional(self) -> bool:
        """Written from something other than the official code (see ``basis``)."""
        return self.basis != "official code"

    @property
    def code(self) -> str:
        """The source without its module docstring, which the page shows as prose."""
        return strip_docstring(self.source)

    @property
    def fence(self) -> str:
        """A code fence longer than any run of backticks in the code."""
        longest = max((len(run) for run in re.findall(r"`+", self.code)), default=0)
        return "`" * max(3, longest + 1)


_LIST_ITEM = re.compile(r"^\s*(\d+\.|[-*])\s")
_FIELD = re.compile(r"^(Paper|Official code):\s")  # the docstring's header lines
_URL = re.compile(r"(?<![<`\w/])(?<!\]\()(https?://[^\s<>`]*[^\s<>`.,;:)])")


def _markdown(docstring: str) -> str:
    """Docstrings use reST double backticks, lists without a blank line before them,
    one ``Paper:`` / ``Official code:`` line each, and bare URLs."""
    out: list[str] = []
    for line in docstring.replace("``", "`").splitlines():
        after_text = bool(out and out[-1].strip())
        list_start = _LIST_ITEM.match(line) and not _LIST_ITEM.match(out[-1] if out else "")
        if after_text and ((list_start and not out[-1].startswith(" ")) or _FIELD.match(line)):
            out.append("")
        out.append(_URL.sub(r"<\1>", line))
    return "\n".join(out)


def strip_docstring(source: str) -> str:
    """``source`` without its module docstring and the blank lines after it."""
    tree = ast.parse(source)
    first = tree.body[0] if tree.body else None
    if not (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return source
    lines = source.splitlines(keepends=True)
    rest = lines[: first.lineno - 1] + lines[first.end_lineno :]
    while rest and not rest[0].strip():
        rest.pop(0)
    return "".join(rest)


# How each constructor argument of a benchmark setting reads in words; anything
# else is shown as ``name=value``. ``dim`` is the host's width, not a budget.
_HIDDEN = frozenset({"dim"})
_KEEP = frozenset({"keep_rate", "keep_ratio"})


def _word(key: str, value: object) -> str:
    if key in _KEEP and isinstance(value, int | float):
        return f"keep {value:.0%}"
    if isinstance(value, bool):
        return f"{key} {'on' if value else 'off'}"
    return f"{key}={value}"


def _span(layers: list[int]) -> str:
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"blocks {layers[0]}-{layers[-1]}"
    return f"block{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"


def describe_arguments(arguments: dict) -> str:
    """Constructor arguments in words: ``query_num=144, downsample_ratio=0.333``."""
    shown = (f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in arguments.items())
    return ", ".join(shown) or "the paper's"


def describe_setting(setting: dict[str, dict]) -> str:
    """A benchmark setting in words (blocks counted from 0).

    ``{"0": {"r": 13}, ..., "11": {"r": 13}}`` -> ``r=13 at blocks 0-11``;
    ``{"3": {"keep_rate": 0.7}, "6": ..., "9": ...}`` -> ``keep 70% at blocks 3, 6, 9``;
    a count that changes from block to block reads as a schedule, ``merge_kept from 196 to 2``.
    """
    if not setting:
        return "defaults"
    layers = sorted(setting, key=int)
    kwargs = [{k: v for k, v in setting[n].items() if k not in _HIDDEN} for n in layers]
    blocks = [int(n) for n in layers]
    if len({tuple(kw) for kw in kwargs}) == 1:  # the same arguments everywhere
        parts = []
        for key in kwargs[0]:
            values = [kw[key] for kw in kwargs]
            if all(v == values[0] for v in values):
                parts.append(_word(key, values[0]))
            else:
                parts.append(f"{key} from {values[0]} to {values[-1]}")
        return f"{', '.join(parts) or 'defaults'} at {_span(blocks)}"
    groups: dict[str, list[int]] = {}
    for block, kw in zip(blocks, kwargs, strict=True):
        groups.setdefault(", ".join(_word(k, v) for k, v in kw.items()) or "defaults", []).append(
            block
        )
    return "; ".join(f"{key} at {_span(group)}" for key, group in groups.items())


_TIMM_VIT = re.compile(r"^vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)$")


def host_label(model: str) -> str:
    """``vit_small_patch16_224`` -> ``ViT-S/16``; other names are shown as they are."""
    match = _TIMM_VIT.match(model)
    if not match:
        return model
    return f"ViT-{match[1][0].upper()}/{match[2]}"


HOOK_BASES = {"LLMReducer": "llm", "SequenceMethod": "llm", "Projector": "projector"}


def _registered(node: ast.ClassDef) -> bool:
    return any(getattr(d, "id", "") == "register" for d in node.decorator_list)


def _hook(name: str, bases: dict[str, list[str]], seen: frozenset[str] = frozenset()) -> str:
    """Where a class acts, from its bases (followed through the package's own classes)."""
    if name in HOOK_BASES:
        return HOOK_BASES[name]
    for base in bases.get(name, ()):
        if base not in seen:
            hook = _hook(base, bases, seen | {name})
            if hook != "mid":
                return hook
    return "mid"


def _class_attrs(tree: ast.Module, bases: dict[str, list[str]]) -> dict[str, object]:
    """The class attributes of the module's registered class (else its first class with a
    ``catalog_id``), and ``where`` it acts unless the class says."""
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    for node in sorted(classes, key=lambda n: not _registered(n)):
        attrs = {}
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                value = stmt.value
                if isinstance(value, ast.Call) and value.args:  # frozenset({...})
                    value = value.args[0]
                with contextlib.suppress(ValueError):
                    attrs[stmt.targets[0].id] = ast.literal_eval(value)
        if "catalog_id" in attrs:
            attrs.setdefault("where", _hook(node.name, bases))
            return attrs
    return {}


def _all_bases(trees: list[ast.Module]) -> dict[str, list[str]]:
    """Every class of the package by name, with the names of its bases."""
    return {
        node.name: [getattr(b, "id", getattr(b, "attr", "")) for b in node.bases]
        for tree in trees
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }


def read_modules(reference_dir: Path) -> list[Module]:
    modules = []
    sources = {
        path: path.read_text(encoding="utf-8")
        for path in sorted(reference_dir.glob("*.py"))
        if path.stem not in INFRASTRUCTURE
    }
    trees = {path: ast.parse(source) for path, source in sources.items()}
    bases = _all_bases(list(trees.values()))
    for path, source in sources.items():
        tree = trees[path]
        attrs = _class_attrs(tree, bases)
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
                fixture=read_fixture(reference_dir, path.stem),
            )
        )
    return modules


def read_fixture(reference_dir: Path, module: str) -> dict | None:
    """Where the module's golden fixture came from: ``{"repo", "commit", "file"}``, or None."""
    path = reference_dir.parent / "tests" / "reference" / "fixtures" / f"{module}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return {key: str(data.get(key, "")) for key in ("repo", "commit", "file")}


def package_docstring(reference_dir: Path) -> str:
    tree = ast.parse((reference_dir / "__init__.py").read_text(encoding="utf-8"))
    return _markdown(ast.get_docstring(tree) or "")


def load_results(bench_dir: Path, stem: str = "reference") -> dict[str, dict]:
    """Timing results (``reference-*.json`` or ``vlm-*.json``) by device type.

    Each ViT row gains ``host``, its model's label (``ViT-S/16``), for the pages.
    """
    results = {}
    for path in sorted(bench_dir.glob(f"{stem}-*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for row in data["results"]:
            if "model" in row:
                row["host"] = host_label(row["model"])
        results[data["device"]["type"]] = data
    return results


def device_label(result: dict) -> str:
    """``CPU (x86_64, 2 threads)``, ``CUDA (NVIDIA H200)``."""
    device = result["device"]
    detail = [device["name"]]
    if device["type"] == "cpu" and device.get("threads"):
        detail.append(f"{device['threads']} threads")
    return f"{device['type'].upper()} ({', '.join(detail)})"


@functools.cache
def _catalog_names(root: str, reference_dir: str) -> dict[str, str]:
    from tools.loader import load_catalog

    return {p.id: p.name for p in load_catalog(Path(root), Path(reference_dir)).papers}


def paper_names() -> dict[str, str]:
    """Short name by catalog id, from the catalog the site is built from (the same
    ``ATC_CATALOG`` / ``ATC_REFERENCE`` overrides as ``gen_pages``)."""
    return _catalog_names(
        os.environ.get("ATC_CATALOG", str(paths.CATALOG)),
        os.environ.get("ATC_REFERENCE", str(paths.REFERENCE)),
    )


# Timing plots. Transparent, with mid-grey text and lines and mid-tone bars, so one
# image reads on Material's light and dark schemes alike (about 4:1 against both).
INK = "#7f7f7f"
PALETTE = ("#3b7dd8", "#d9731a", "#2e9e6a", "#a66bd6")


@dataclass(frozen=True)
class BarChart:
    """Horizontal bars: one panel per ``panels``, one bar per ``series`` and ``labels``."""

    title: str
    xlabel: str
    panels: tuple[str, ...]
    series: tuple[str, ...]  # legend entries
    labels: tuple[str, ...]  # one group of bars per label (a paper's short name), top first
    values: tuple[tuple[tuple[float | None, ...], ...], ...]  # [panel][series][label]


def _chart(result: dict, names, panel_of, series_of, panel_label, series_label, key, xlabel):
    rows = result["results"]
    panels = sorted({panel_of(r) for r in rows}, key=_natural)
    series = sorted({series_of(r) for r in rows}, key=_natural)
    value = {(panel_of(r), series_of(r), r["method"]): r[key] for r in rows}

    def mean(method: str) -> float:
        got = [v for (_, _, m), v in value.items() if m == method]
        return sum(got) / len(got)

    methods = sorted({r["method"] for r in rows}, key=lambda m: (-mean(m), names.get(m, m)))
    return BarChart(
        title=f"{device_label(result)}, torch {result['versions']['torch']}, {result['date'][:10]}",
        xlabel=xlabel,
        panels=tuple(panel_label(p) for p in panels),
        series=tuple(series_label(s) for s in series),
        labels=tuple(names.get(m, m) for m in methods),
        values=tuple(
            tuple(tuple(value.get((p, s, m)) for m in methods) for s in series) for p in panels
        ),
    )


def _natural(value):
    """Model names by size (S before B), numbers by value."""
    if isinstance(value, str):
        match = _TIMM_VIT.match(value)
        sizes = "tsblh"
        return (sizes.index(match[1][0]), int(match[2]), value) if match else (9, 0, value)
    return value


def speedup_chart(result: dict, names: Mapping[str, str]) -> BarChart:
    """ViT host: one panel per model, one bar per batch size."""
    return _chart(
        result,
        names,
        lambda r: r["model"],
        lambda r: r["batch"],
        lambda model: f"{host_label(model)} ({model.rsplit('_', 1)[-1]} px)",
        lambda batch: f"batch {batch}",
        "speedup",
        "throughput speedup (dense time / reduced time)",
    )


def vlm_chart(result: dict, names: Mapping[str, str]) -> BarChart:
    """LLaVA-style host: one panel per batch size, one bar per visual-token budget."""
    total = result["results"][0]["visual_tokens"] if result["results"] else 0
    return _chart(
        result,
        names,
        lambda r: r["batch"],
        lambda r: r["keep"],
        lambda batch: f"batch {batch}",
        lambda keep: f"keep {keep} of {total}",
        "prefill_speedup",
        "prefill speedup (time with all visual tokens / with those kept)",
    )


def render_chart(chart: BarChart) -> bytes:
    """PNG bytes: the legend above the panels, clear of every bar; provenance below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_series, n_labels = len(chart.series), len(chart.labels)
    group = 0.8
    height = group / max(1, n_series)
    fig_h = 1.5 + n_labels * (0.16 * n_series + 0.12)
    with plt.rc_context(
        {
            "text.color": INK,
            "axes.labelcolor": INK,
            "axes.edgecolor": INK,
            "xtick.color": INK,
            "ytick.color": INK,
            "font.size": 10,
        }
    ):
        fig, axes = plt.subplots(
            1,
            len(chart.panels),
            figsize=(6.4, fig_h),
            dpi=200,
            sharey=True,
            squeeze=False,
            layout="constrained",
        )
        top = max((v for p in chart.values for s in p for v in s if v is not None), default=1)
        for ax, panel, values in zip(axes[0], chart.panels, chart.values, strict=True):
            for i, (label, bars) in enumerate(zip(chart.series, values, strict=True)):
                ys = [m + (i - (n_series - 1) / 2) * height for m in range(n_labels)]
                xs = [v or 0 for v in bars]
                drawn = ax.barh(
                    ys, xs, height=height * 0.92, color=PALETTE[i % len(PALETTE)], label=label
                )
                ax.bar_label(
                    drawn,
                    labels=[f"{v:.2f}×" if v is not None else "" for v in bars],
                    padding=2,
                    fontsize=8.5,
                    color=INK,
                )
            ax.axvline(1.0, color=INK, linewidth=0.8, linestyle="--")
            ax.set_xlim(0, top * 1.22)
            ax.set_title(panel, fontsize=10)
            ax.set_yticks(range(n_labels), chart.labels)
            ax.tick_params(axis="y", length=0)
            ax.spines[["top", "right"]].set_visible(False)
            ax.set_facecolor("none")
        axes[0][0].invert_yaxis()
        # The provenance goes under the axis label: a title above would collide with the legend.
        fig.supxlabel(f"{chart.xlabel}\n{chart.title}", fontsize=9)
        handles, labels = axes[0][0].get_legend_handles_labels()
        # One row when the entries fit across the figure (about 70 characters), else two.
        one_row = sum(len(label) + 6 for label in labels) <= 70
        fig.legend(
            handles,
            labels,
            loc="outside upper center",
            ncols=n_series if one_row else -(-n_series // 2),
            frameon=False,
            fontsize=9,
        )
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", transparent=True)
        plt.close(fig)
    return buffer.getvalue()


def speedup_plot(result: dict, names: Mapping[str, str] | None = None) -> bytes:
    """ViT host: speedup of each method per model and batch, labelled by paper names."""
    return render_chart(speedup_chart(result, paper_names() if names is None else names))


def vlm_plot(result: dict, names: Mapping[str, str] | None = None) -> bytes:
    """LLaVA host: prefill speedup of each method per batch and visual-token budget."""
    return render_chart(vlm_chart(result, paper_names() if names is None else names))
