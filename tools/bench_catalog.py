"""``python -m tools bench-catalog``: time validate, render, export and the site build.

Times the real catalog, then a generated catalog of ``--papers`` entries (copies
of the real ones with unique ids, arXiv ids and links), and writes the medians
with the machine, Python and library versions to a JSON results file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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


def time_site(catalog_dir: Path, repeat: int, warm_up: bool = True) -> float:
    """Wall clock of ``mkdocs build`` for a catalog (pages generated from it)."""
    env = {
        **os.environ,
        "ATC_CATALOG": str(catalog_dir),
        "DISABLE_MKDOCS_2_WARNING": "true",
        "NO_MKDOCS_2_WARNING": "1",
    }
    with tempfile.TemporaryDirectory() as site_dir:
        command = [sys.executable, "-m", "mkdocs", "build", "--quiet", "-d", site_dir]
        return median_seconds(
            lambda: subprocess.run(
                command, cwd=paths.ROOT, env=env, check=True, capture_output=True
            ),
            repeat,
            warm_up,
        )


def run(count: int, repeat: int, output: Path | None, site: bool = True) -> dict:
    runs = [time_catalog(paths.CATALOG, paths.REFERENCE, repeat)]
    runs[0]["cli_render_check_s"] = round(time_cli(repeat), 4)
    if site:
        runs[0]["site_build_s"] = round(time_site(paths.CATALOG, paths.REFERENCE, repeat), 2)
    with tempfile.TemporaryDirectory() as tmp:
        catalog_dir, no_modules = Path(tmp) / "catalog", Path(tmp) / "reference"
        no_modules.mkdir()
        generate_catalog(catalog_dir, count)
        runs.append(time_catalog(catalog_dir, no_modules, max(1, repeat // 2)))
        if site:
            # A single cold build: a large site takes a while.
            runs[-1]["site_build_s"] = round(
                time_site(catalog_dir, no_modules, 1, warm_up=False), 2
            )
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
    for row in runs:
        cells = "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "papers")
        print(f"{row['papers']:>6} papers  {cells}")
    if output:
        from tools.writeout import write_atomic

        write_atomic(output, json.dumps(result, indent=2) + "\n")
        print(f"{output}: written")
    return result
