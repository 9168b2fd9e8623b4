"""``python -m tools bench-catalog``: time validate, render, export, the site build
and the papers index in a browser.

Times the real catalog, then a generated catalog of ``--papers`` entries (copies
of the real ones with unique ids, arXiv ids and links), and writes the medians
with the machine, Python, library and browser versions to a JSON results file.

The papers index (``papers/index.html`` of each built site) is opened in Debian's
Chromium through Playwright at 1440x900: ``index_dom_content_loaded_ms`` (navigation
start to the end of DOMContentLoaded, the index script's set-up included),
``index_setup_ms`` (that set-up alone), ``index_filter_ms`` (one facet change, from
the event to the next frame painted; the changes alternate between a modality and
"any", that is between a subset and every row) and ``index_search_ms`` (one text-box
change, likewise), each a median after a discarded warm-up, with the slowest change
as ``*_max_ms``. Without Playwright or Chromium those keys are absent and
``machine.chromium`` says why.

``machine.load_average_1min`` is the load average before and after the run, beside
``machine.cpus``: on a shared machine, read every figure against it.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pydantic
import yaml

from tools import paths
from tools.export_bibtex import render_bibtex
from tools.export_json import render_json
from tools.loader import load_catalog
from tools.render_readme import render_readme


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def generate_catalog(target: Path, count: int) -> None:
    """Write ``count`` valid entries into ``target``, cycling through the real ones."""
    papers = target / paths.PAPERS_DIRNAME
    papers.mkdir(parents=True)  # entries link no reference module: pass an empty reference dir
    shutil.copy(paths.CATALOG / paths.TAXONOMY_FILENAME, target / paths.TAXONOMY_FILENAME)
    sources = sorted((paths.CATALOG / paths.PAPERS_DIRNAME).glob("*.yaml"))
    templates = [yaml.safe_load(p.read_text(encoding="utf-8")) for p in sources]
    for index in range(count):
        data = dict(templates[index % len(templates)])
        # 2018-2025: after the earliest release the checks accept, before today.
        year, month = 2018 + index % 8, 1 + (index // 8) % 12
        arxiv_id = f"{year % 100:02d}{month:02d}.{10000 + index:05d}"
        data.update(
            id=f"paper_{index:05d}",
            # Titles and short names must be unique across the catalog.
            name=f"{data['name']} {index}",
            title=f"{data['title']} ({index})",
            arxiv=arxiv_id,
            openreview=None,
            released=f"{year}-{month:02d}",
            venue="arXiv",
            reference=None,
            links={
                "abstract": f"https://arxiv.org/abs/{arxiv_id}",
                "pdf": f"https://arxiv.org/pdf/{arxiv_id}",
                "code": f"https://github.com/example/paper-{index}",
                "project": None,
            },
        )
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        (papers / f"{data['id']}.yaml").write_text(text, encoding="utf-8")


def median_seconds(func: Callable[[], object], repeat: int, warm_up: bool = True) -> float:
    if warm_up:
        func()  # discarded
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_catalog(root: Path, reference_dir: Path, repeat: int) -> dict:
    readme = paths.README.read_text(encoding="utf-8")
    catalog = load_catalog(root, reference_dir)
    timings = {
        "validate_s": median_seconds(lambda: load_catalog(root, reference_dir), repeat),
        "render_s": median_seconds(lambda: render_readme(readme, catalog), repeat),
        "export_json_s": median_seconds(lambda: render_json(catalog), repeat),
        "export_bibtex_s": median_seconds(lambda: render_bibtex(catalog), repeat),
    }
    timings["total_s"] = sum(timings.values())
    return {"papers": len(catalog.entries), **{k: round(v, 4) for k, v in timings.items()}}


def time_cli(repeat: int) -> float:
    """Wall clock of a whole `python -m tools render --check` process, imports included."""
    command = [sys.executable, "-m", "tools", "render", "--check"]
    return median_seconds(
        lambda: subprocess.run(command, cwd=paths.ROOT, check=True, capture_output=True), repeat
    )


def time_site(
    catalog_dir: Path,
    reference_dir: Path,
    repeat: int,
    site_dir: Path,
    warm_up: bool = True,
) -> float:
    """Wall clock of ``mkdocs build`` for a catalog (pages generated from it) into ``site_dir``."""
    env = {
        **os.environ,
        "ATC_CATALOG": str(catalog_dir),
        "ATC_REFERENCE": str(reference_dir),
        "DISABLE_MKDOCS_2_WARNING": "true",
        "NO_MKDOCS_2_WARNING": "1",
    }
    command = [sys.executable, "-m", "mkdocs", "build", "--quiet", "-d", str(site_dir)]
    return median_seconds(
        lambda: subprocess.run(command, cwd=paths.ROOT, env=env, check=True, capture_output=True),
        repeat,
        warm_up,
    )


# The papers index in a browser

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1440, "height": 900}
# Resolves after the next frame: the change has been styled, laid out and painted.
_NEXT_FRAME = "new Promise(r => requestAnimationFrame(() => setTimeout(r)))"
_CHANGE = f"""async ([id, value, type]) => {{
  const control = document.getElementById(id);
  await {_NEXT_FRAME};
  const start = performance.now();
  control.value = value;
  control.dispatchEvent(new Event(type, {{bubbles: true}}));
  await {_NEXT_FRAME};
  return performance.now() - start;
}}"""
_LOAD = """() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const mark = name => performance.getEntriesByName(name)[0].startTime;
  return {
    dcl: nav.domContentLoadedEventEnd,
    setup: mark('atc-index-ready') - mark('atc-index-start'),
    rows: document.querySelectorAll('#atc-papers tbody tr').length,
  };
}"""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A navigation that starts before the last one finished drops its connection.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def chromium_path() -> str | None:
    found = shutil.which("chromium") or "/usr/bin/chromium"
    return found if Path(found).exists() else None


def time_index(site_dir: Path, repeat: int) -> dict:
    """Load and filter ``papers/index.html`` of a built site in Chromium; medians in ms."""
    from playwright.sync_api import sync_playwright

    handler = functools.partial(_Quiet, directory=str(site_dir))
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/papers/"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            context = browser.new_context(viewport=VIEWPORT)
            # The site loads nothing from elsewhere; make sure the timing does not either.
            context.route(
                "**/*",
                lambda route: (
                    route.continue_()
                    if urlsplit(route.request.url).hostname == "127.0.0.1"
                    else route.abort()
                ),
            )
            page = context.new_page()
            loads = []
            for _ in range(repeat + 1):  # the first load is a warm-up
                page.goto(url, wait_until="load")
                loads.append(page.evaluate(_LOAD))
            loads = loads[1:]
            facet = ["video", "", "image", "", "document", ""] * max(1, repeat // 3)
            filters = [page.evaluate(_CHANGE, ["atc-filter-modality", v, "change"]) for v in facet]
            # The first text search also builds the lowercase haystacks: a warm-up.
            words = ["", "merging", "", "token merging", "", "video"] * max(1, repeat // 3)
            page.evaluate(_CHANGE, ["atc-filter-text", "pruning", "input"])
            searches = [page.evaluate(_CHANGE, ["atc-filter-text", w, "input"]) for w in words]
            version = browser.version
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    html = site_dir / "papers" / "index.html"
    return {
        "index_rows": loads[0]["rows"],
        "index_html_mb": round(html.stat().st_size / 1e6, 2),
        "index_dom_content_loaded_ms": round(statistics.median(x["dcl"] for x in loads), 1),
        "index_setup_ms": round(statistics.median(x["setup"] for x in loads), 1),
        "index_filter_ms": round(statistics.median(filters[1:]), 1),
        "index_filter_max_ms": round(max(filters[1:]), 1),
        "index_search_ms": round(statistics.median(searches), 1),
        "index_search_max_ms": round(max(searches), 1),
        "chromium": version,
    }


def _browser_problem() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "not measured: playwright is not installed (pip install -e .[test])"
    if chromium_path() is None:
        return "not measured: Debian's chromium is not installed"
    return None


def run(count: int, repeat: int, output: Path | None, site: bool = True) -> dict:
    load_before = os.getloadavg()[0]  # a shared machine: say how busy it was
    browser_problem = _browser_problem() if site else "not measured: --no-site"
    chromium = browser_problem

    def measure_site(row: dict, catalog_dir: Path, reference_dir: Path, builds: int) -> None:
        """Site build time (a single cold build when ``builds`` is 1), then the index."""
        nonlocal chromium
        with tempfile.TemporaryDirectory() as site_dir:
            seconds = time_site(catalog_dir, reference_dir, builds, Path(site_dir), builds > 1)
            row["site_build_s"] = round(seconds, 2)
            if browser_problem is None:
                index = time_index(Path(site_dir), repeat)
                chromium = index.pop("chromium")
                row.update(index)

    runs = [time_catalog(paths.CATALOG, paths.REFERENCE, repeat)]
    runs[0]["cli_render_check_s"] = round(time_cli(repeat), 4)
    if site:
        measure_site(runs[0], paths.CATALOG, paths.REFERENCE, repeat)
    with tempfile.TemporaryDirectory() as tmp:
        catalog_dir, no_modules = Path(tmp) / "catalog", Path(tmp) / "reference"
        no_modules.mkdir()
        generate_catalog(catalog_dir, count)
        runs.append(time_catalog(catalog_dir, no_modules, max(1, repeat // 2)))
        if site:
            # A single cold build: a large site takes a while.
            measure_site(runs[-1], catalog_dir, no_modules, 1)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "python": platform.python_version(),
            "pydantic": pydantic.VERSION,
            "pyyaml": yaml.__version__,
            "yaml_c_loader": hasattr(yaml, "CSafeLoader"),
        },
        "repeat": repeat,
        "runs": runs,
    }
    result["machine"]["mkdocs_material"] = _version("mkdocs-material")
    result["machine"]["mkdocs"] = _version("mkdocs")
    result["machine"]["playwright"] = _version("playwright")
    result["machine"]["chromium"] = chromium
    result["machine"]["cpus"] = os.cpu_count()
    result["machine"]["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    for row in runs:
        cells = "  ".join(f"{k} {v:g}" for k, v in row.items() if k != "papers")
        print(f"{row['papers']:>6} papers  {cells}")
    if output:
        from tools.writeout import write_atomic

        write_atomic(output, json.dumps(result, indent=2) + "\n")
        print(f"{output}: written")
    return result
