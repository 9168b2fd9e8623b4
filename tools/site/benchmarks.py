"""Measured speed on the site: the method comparison page and each paper's speedup.

Everything here is read from the committed results files in ``docs/benchmarks/``
(``reference-<device>.json``, ``vlm-<device>.json``, ``projector-<device>.json``);
no number is typed in.
Methods are named by their paper's short name; catalog strings reach the page
through ``mdtext`` (Markdown) or markupsafe (HTML), so they show as text.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from markupsafe import Markup

from tools.loader import Catalog
from tools.refs import declared_ids
from tools.schema import PaperBase
from tools.site.pages import mdtext, site_environment
from tools.site.reference_pages import (
    describe_setting,
    device_label,
    host_label,
    read_modules,
)

EMPTY = "—"
NBSP = "\u00a0"
HOSTS = {"vit": "ViT host", "vlm": "LLaVA-style host", "projector": "Projectors"}
RESULTS_STEM = {"vit": "reference", "vlm": "vlm", "projector": "projector"}


@dataclass(frozen=True)
class Column:
    header: str
    numeric: bool = False

    @property
    def rule(self) -> str:
        """The Markdown table rule: numbers align right."""
        return "---:" if self.numeric else "---"


@dataclass(frozen=True)
class Table:
    heading: str
    anchor: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[Markup, ...], ...]


def drop_empty_columns(table: Table) -> Table:
    """Without the columns in which no row has a value (peak memory off CUDA, say)."""
    keep = [i for i in range(len(table.columns)) if any(row[i] != EMPTY for row in table.rows)]
    return Table(
        table.heading,
        table.anchor,
        tuple(table.columns[i] for i in keep),
        tuple(tuple(row[i] for i in keep) for row in table.rows),
    )


def devices(results: dict[str, dict]) -> list[str]:
    """Device types in page order: the CPU first, then the others by name."""
    return sorted(results, key=lambda d: (d != "cpu", d))


def speedup(value: float) -> str:
    return f"{value:.2f}×"


def _arrow(before: float | None, after: float | None, fmt: str, sep: str = " ") -> str:
    """``16.9 → 26.8``; ``sep`` around the arrow (a no-break space keeps it on one line)."""
    if before is None and after is None:
        return EMPTY
    shown = [EMPTY if v is None else format(v, fmt) for v in (before, after)]
    return f"{shown[0]}{sep}→{sep}{shown[1]}"


@functools.cache
def _bench_defaults() -> dict[str, object]:
    """The defaults of ``python -m tools bench``, so the command shown is the one that ran."""
    from tools.cli import build_parser

    return vars(build_parser().parse_args(["bench"]))


def bench_command(suite: str, data: dict) -> str:
    """The command that measures ``data`` again (options left at their default omitted)."""
    defaults = _bench_defaults()
    parts = ["python -m tools bench", f"--suite {suite}", f"--device {data['device']['type']}"]
    rows = data["results"]
    if suite == "vit":
        models = ",".join(dict.fromkeys(r["model"] for r in rows))
        if rows and models != defaults["models"]:
            parts.append(f"--models {models}")
    batches = ",".join(map(str, sorted({r["batch"] for r in rows if "batch" in r})))
    if suite != "projector" and rows and batches != defaults["batch"]:  # projectors: batch 1
        parts.append(f"--batch {batches}")
    for option in ("repeat", "warmup"):
        if data.get(option) is not None and data[option] != defaults[option]:
            parts.append(f"--{option} {data[option]}")
    return " ".join(parts)


def provenance(suite: str, data: dict) -> str:
    """Where the numbers came from: date, command, device, library versions."""
    versions = data["versions"]
    return (
        f"Measured on {data['date'][:10]} by `{bench_command(suite, data)}` "
        f"(results file `docs/benchmarks/{RESULTS_STEM[suite]}-"
        f"{data['device']['type']}.json`): {device_label(data)}, torch {versions['torch']}, "
        f"Python {versions['python']}, {data['dtype']}, {versions['platform']}."
    )


def _code(name: str) -> Markup:
    """``name`` as inline code: a catalog id as it is (escapes show inside a code span),
    anything else as escaped text."""
    if re.fullmatch(r"[a-z][a-z0-9_]*", name):
        return Markup("`{}`").format(Markup(name))
    return mdtext(name)


class _Methods:
    """How a method is shown: its paper's short name, linked, and marked when provisional."""

    def __init__(self, catalog: Catalog):
        self.papers = {p.id: p for p in catalog.papers}
        self.modules = {m.catalog_id: m for m in read_modules(catalog.reference_dir)}
        baselines = catalog.reference_dir / "baselines.py"
        self.baselines = {i for i, _ in declared_ids(baselines)} if baselines.is_file() else set()

    def name(self, method: str) -> str:
        paper = self.papers.get(method)
        return paper.name if paper else method

    def cell(self, method: str) -> Markup:
        paper = self.papers.get(method)
        if method in self.baselines:  # no paper: a reference point (reference/baselines.py)
            return mdtext(method.replace("_", " ").capitalize() + " (baseline)")
        if paper is None:  # results for a method the catalog no longer has
            return _code(method)
        link = Markup("[{}](papers/{}.md)").format(mdtext(paper.name), paper.id)
        module = self.modules.get(method)
        if module is not None and module.provisional:
            link += Markup(" ([provisional](reference/{}.md))").format(module.name)
        return link

    def reduces(self, method: str) -> Markup:
        module = self.modules.get(method)
        if module is None:
            return Markup(EMPTY)
        where = "in the language model" if module.where == "llm" else "in the vision tower"
        return mdtext(f"{module.kind} {where}" if module.kind else where)


def _by_speedup(rows: dict[str, dict], key: str, names) -> list[str]:
    """Methods fastest first; methods without a row last, then by name."""
    return sorted(rows, key=lambda m: (-(rows[m] or {}).get(key, 0), names(m)))


def vit_tables(data: dict, methods: _Methods) -> list[Table]:
    """One table per host model: a row per method, a column per batch size."""
    device = data["device"]["type"]
    tables = []
    for model in dict.fromkeys(r["model"] for r in data["results"]):
        rows = [r for r in data["results"] if r["model"] == model]
        batches = sorted({r["batch"] for r in rows})
        by = {(r["method"], r["batch"]): r for r in rows}
        largest = {r["method"]: by.get((r["method"], batches[-1])) for r in rows}
        columns = [
            Column("Method"),
            Column("Setting"),
            Column("Tokens"),
            Column("GFLOPs per image"),
            *(Column(f"Batch {b}: speedup, img/s", True) for b in batches),
            *(Column(f"Peak MB, batch {b}, dense → reduced") for b in batches),
        ]
        body = []
        for method in _by_speedup(largest, "speedup", methods.name):
            any_row = largest[method] or next(r for r in rows if r["method"] == method)
            setting = describe_setting(any_row["setting"])
            if any_row.get("proportional_attn"):
                setting += ", proportional attention"
            cells = [
                methods.cell(method),
                mdtext(setting),
                Markup(f"{any_row['tokens_in']} → {any_row['tokens_final']}"),
                Markup(_arrow(any_row["base_gflops"], any_row["gflops"], ".1f")),
            ]
            for b in batches:
                r = by.get((method, b))
                cells.append(
                    Markup(
                        f"**{speedup(r['speedup'])}**<br>"
                        + _arrow(r["base_img_s"], r["img_s"], ".1f", sep=NBSP)
                    )
                    if r
                    else Markup(EMPTY)
                )
            for b in batches:
                r = by.get((method, b)) or {}
                cells.append(Markup(_arrow(r.get("base_peak_mb"), r.get("peak_mb"), ".0f")))
            body.append(tuple(cells))
        label = f"{host_label(model)}, {model.rsplit('_', 1)[-1]} px"
        slug = model.replace("_", "-")
        tables.append(
            drop_empty_columns(Table(label, f"vit-{device}-{slug}", tuple(columns), tuple(body)))
        )
    return tables


def vlm_tables(data: dict, methods: _Methods) -> list[Table]:
    """One table per batch size: a row per method, a column per visual-token budget."""
    device = data["device"]["type"]
    tables = []
    results = data["results"]
    for batch in sorted({r["batch"] for r in results}):
        rows = [r for r in results if r["batch"] == batch]
        keeps = sorted({r["keep"] for r in rows})
        by = {(r["method"], r["keep"]): r for r in rows}
        tightest = {r["method"]: by.get((r["method"], keeps[0])) for r in rows}
        total = rows[0]["visual_tokens"]
        columns = [
            Column("Method"),
            Column("Reduction"),
            *(Column(f"Keep {k} of {total}: speedup, ms, TFLOPs", True) for k in keeps),
            *(Column(f"Peak MB, {k} kept") for k in keeps),
        ]
        body = []
        for method in _by_speedup(tightest, "prefill_speedup", methods.name):
            cells = [methods.cell(method), methods.reduces(method)]
            for k in keeps:
                r = by.get((method, k))
                cells.append(
                    Markup(
                        f"**{speedup(r['prefill_speedup'])}**<br>"
                        + _arrow(r["base_prefill_ms"], r["prefill_ms"], ".0f", sep=NBSP)
                        + "<br>"
                        + _arrow(r["base_tflops"], r["tflops"], ".3f", sep=NBSP)
                    )
                    if r
                    else Markup(EMPTY)
                )
            for k in keeps:
                r = by.get((method, k)) or {}
                cells.append(Markup(EMPTY if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"))
            body.append(tuple(cells))
        tables.append(
            drop_empty_columns(
                Table(f"Batch {batch}", f"vlm-{device}-batch-{batch}", tuple(columns), tuple(body))
            )
        )
    return tables


def projector_tables(data: dict, methods: _Methods) -> list[Table]:
    """One table: a row per projector and output count, the cheapest compressor first."""
    device = data["device"]["type"]
    rows = sorted(data["results"], key=lambda r: (r["tokens_out"], r["ms"] / r["base_ms"]))
    if not rows:
        return []
    base = rows[0]
    columns = (  # the setting of each row is on the method's reference page
        Column("Method"),
        Column("Tokens out", True),
        Column(f"Parameters, M (MLP {base['base_params_m']:.2f})", True),
        Column("Compressor GFLOPs and ms, MLP → projector"),
        Column("Prefill speedup, ms", True),
        Column("Peak MB"),
    )
    body = []
    for r in rows:
        if "prefill_speedup" in r:
            prefill = Markup(
                f"**{speedup(r['prefill_speedup'])}**<br>"
                + _arrow(r["base_prefill_ms"], r["prefill_ms"], ".0f", sep=NBSP)
            )
        else:
            prefill = Markup("not run: {}").format(mdtext(r.get("prefill_error", "")))
        body.append(
            (
                methods.cell(r["method"]),
                Markup(str(r["tokens_out"])),
                Markup(f"{r['params_m']:.2f}"),
                Markup(
                    _arrow(r["base_gflops"], r["gflops"], ".2f", sep=NBSP)
                    + "<br>"
                    + _arrow(r["base_ms"], r["ms"], ".1f", sep=NBSP)
                ),
                prefill,
                Markup(EMPTY if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"),
            )
        )
    heading = "Projectors at the LLaVA-1.5 shape"
    return [drop_empty_columns(Table(heading, f"projector-{device}-table", columns, tuple(body)))]


@dataclass(frozen=True)
class Section:
    """One host on one device: where the numbers came from, a plot, the tables."""

    suite: str
    device: str
    anchor: str
    provenance: str
    plot: str
    tables: list[Table]
    data: dict


def comparison_page(
    catalog: Catalog,
    reference_results: dict[str, dict],
    vlm_results: dict[str, dict],
    projector_results: dict[str, dict] | None = None,
) -> str:
    """Text of ``comparison.md``: every benchmarked method side by side."""
    methods = _Methods(catalog)
    sections: dict[str, list[Section]] = {"vit": [], "vlm": [], "projector": []}
    for suite, results, plot, build in (
        ("vit", reference_results, "speedup", vit_tables),
        ("vlm", vlm_results, "vlm-prefill", vlm_tables),
        ("projector", projector_results or {}, "", projector_tables),
    ):
        for device in devices(results):
            data = results[device]
            sections[suite].append(
                Section(
                    suite,
                    device,
                    f"{suite}-{device}",
                    provenance(suite, data),
                    f"performance/{plot}-{device}.png",
                    build(data, methods),
                    data,
                )
            )
    template = site_environment().get_template("comparison.md.j2")
    return template.render(sections=sections, hosts=HOSTS)


def _line(text: str, *args) -> Markup:
    return Markup(text).format(*args)


def paper_speed(
    paper: PaperBase,
    reference_results: dict[str, dict],
    vlm_results: dict[str, dict],
    projector_results: dict[str, dict] | None = None,
) -> str:
    """An HTML fragment for the paper page: the measured speedup and budget, or ``""``.

    One line per host model (ViT) or per host (VLM) and device, at the largest batch
    measured; the other batch sizes are on the comparison page it links to.
    """
    items: list[Markup] = []
    anchors: list[str] = []
    for device in devices(reference_results):
        data = reference_results[device]
        rows = [r for r in data["results"] if r["method"] == paper.id]
        if not rows:
            continue
        anchors.append(f"vit-{device}")
        batch = max(r["batch"] for r in rows)
        for r in (r for r in rows if r["batch"] == batch):
            setting = describe_setting(r["setting"])
            items.append(
                _line(
                    "{}, batch {}: <strong>{}</strong> throughput ({} img/s), {} tokens ({}); "
                    "{}, torch {}, {}.",
                    host_label(r["model"]),
                    r["batch"],
                    speedup(r["speedup"]),
                    _arrow(r["base_img_s"], r["img_s"], ".1f"),
                    f"{r['tokens_in']} → {r['tokens_final']}",
                    setting,
                    data["device"]["type"].upper(),
                    data["versions"]["torch"],
                    data["date"][:10],
                )
            )
    for device in devices(vlm_results):
        data = vlm_results[device]
        rows = [r for r in data["results"] if r["method"] == paper.id]
        if not rows:
            continue
        anchors.append(f"vlm-{device}")
        batch = max(r["batch"] for r in rows)
        rows = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["keep"])
        first, rest = rows[0], rows[1:]
        budgets = Markup("").join(
            _line(", {} keeping {}", speedup(r["prefill_speedup"]), r["keep"]) for r in rest
        )
        items.append(
            _line(
                "LLaVA-style host, batch {}: prefill <strong>{}</strong> faster keeping {} of {} "
                "visual tokens ({} ms){}; {}, torch {}, {}.",
                batch,
                speedup(first["prefill_speedup"]),
                first["keep"],
                first["visual_tokens"],
                _arrow(first["base_prefill_ms"], first["prefill_ms"], ".0f"),
                budgets,
                data["device"]["type"].upper(),
                data["versions"]["torch"],
                data["date"][:10],
            )
        )
    for device in devices(projector_results or {}):
        data = projector_results[device]
        rows = [r for r in data["results"] if r["method"] == paper.id]
        if not rows:
            continue
        anchors.append(f"projector-{device}")
        counts = Markup(", ").join(
            _line(
                "{} tokens: {} M parameters, {} ms against the MLP's {} ms",
                r["tokens_out"],
                f"{r['params_m']:.2f}",
                f"{r['ms']:.1f}",
                f"{r['base_ms']:.1f}",
            )
            for r in sorted(rows, key=lambda r: r["tokens_out"])
        )
        items.append(
            _line(
                "In place of LLaVA-1.5's MLP projector, from {} patch features: {}; {}, torch "
                "{}, {}.",
                rows[0]["tokens_in"],
                counts,
                data["device"]["type"].upper(),
                data["versions"]["torch"],
                data["date"][:10],
            )
        )
    if not items:
        return ""
    link = _line('<a href="../../comparison/#{}">the method comparison</a>', anchors[0])
    return str(
        _line(
            '<div class="atc-speed">\n<p>Measured speed of this implementation, in the paper\'s '
            "setting:</p>\n<ul>\n{}\n</ul>\n<p>Speedup: the host's time without the method over "
            "its time with it, medians measured alternately in one run by <code>python -m tools "
            "bench</code>. Other batch sizes, and every other method on the same host: {}.</p>"
            "\n</div>",
            Markup("\n").join(_line("<li>{}</li>", item) for item in items),
            link,
        )
    )
