"""mkdocs-gen-files script: write every catalog-derived page into the build.

Run by ``mkdocs build`` (see ``mkdocs.yml``); nothing here is committed. The
catalog and reference directories can be overridden with ``ATC_CATALOG`` and
``ATC_REFERENCE`` (the tests and the benchmark build sites from other catalogs).
"""

from __future__ import annotations

import os
from pathlib import Path

import mkdocs_gen_files

from tools import paths
from tools.loader import load_catalog
from tools.problems import CatalogInvalid
from tools.site import benchmarks, index_page, pages, reference_pages
from tools.site.feed import render_feed


def write(path: str, text: str) -> None:
    with mkdocs_gen_files.open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def main() -> None:
    root = Path(os.environ.get("ATC_CATALOG", paths.CATALOG))
    reference_dir = Path(os.environ.get("ATC_REFERENCE", paths.REFERENCE))
    try:
        catalog = load_catalog(root, reference_dir)
    except CatalogInvalid as exc:
        raise SystemExit("\n".join(map(str, exc.problems))) from None
    config = mkdocs_gen_files.config
    # Derived from ATC_REPOSITORY by tools/site/hooks.py (empty when unset).
    options = pages.SiteOptions(
        edit_base=config["extra"].get("edit_base") or "",
        repository=config["extra"].get("repository") or "",
    )

    results = reference_pages.load_results(paths.CATALOG_BENCH.parent)
    vlm_results = reference_pages.load_results(paths.CATALOG_BENCH.parent, "vlm")
    projector_results = reference_pages.load_results(paths.CATALOG_BENCH.parent, "projector")
    write("index.md", pages.home_page(catalog, options))
    write("papers/index.md", index_page.index_page(catalog))
    boosts = pages.search_boosts(catalog)
    for entry in catalog.entries:
        paper = entry.paper
        speed = benchmarks.paper_speed(paper, results, vlm_results, projector_results)
        page = pages.paper_page(catalog, paper, options, speed=speed, search_boost=boosts[paper.id])
        write(f"papers/{paper.id}.md", page)
        # The entry itself ships with the site: "Edit this page" falls back to it.
        write(f"catalog/papers/{paper.id}.yaml", entry.path.read_text(encoding="utf-8"))
        mkdocs_gen_files.set_edit_path(f"papers/{paper.id}.md", f"catalog/papers/{paper.id}.yaml")
    write("taxonomy.md", pages.taxonomy_page(catalog))
    # The navigation; tools/site/hooks.py keeps it from being built as a page.
    write("SUMMARY.md", pages.summary_nav())
    write("feed.xml", render_feed(catalog, config["site_url"]))
    for path, text in pages.downloads(catalog).items():
        write(path, text)
    write(
        "comparison.md",
        benchmarks.comparison_page(catalog, results, vlm_results, projector_results),
    )
    write("performance.md", pages.performance_page(paths.CATALOG_BENCH, results, vlm_results))
    plots = [(f"speedup-{d}", r, reference_pages.speedup_plot) for d, r in results.items()]
    plots += [(f"vlm-prefill-{d}", r, reference_pages.vlm_plot) for d, r in vlm_results.items()]
    names = {p.id: p.name for p in catalog.papers}
    for name, result, plot in plots:
        with mkdocs_gen_files.open(f"performance/{name}.png", "wb") as handle:
            handle.write(plot(result, names))
    modules = reference_pages.read_modules(reference_dir)
    contract = reference_pages.package_docstring(paths.REFERENCE)
    write("reference/index.md", pages.reference_index_page(catalog, modules, contract))
    papers = {p.id: p for p in catalog.papers}
    for module in modules:
        if module.catalog_id in papers:
            page = pages.reference_module_page(
                module, papers[module.catalog_id], results, vlm_results, projector_results
            )
            write(f"reference/{module.name}.md", page)


main()
