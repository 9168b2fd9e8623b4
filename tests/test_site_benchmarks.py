"""Measured speed on the site (comparison page, paper pages, plots) and the reference pages.

Most tests render page texts from small fake results; one builds the site to check
the search index and looks at the comparison page in Chromium.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from html import unescape
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import markdown
import pytest

from tools import paths
from tools.loader import load_catalog
from tools.site import benchmarks, pages
from tools.site import reference_pages as rp


def vit_row(method, speedup, batch=8, model="vit_small_patch16_224", peak=None, **extra):
    return {
        "model": model,
        "batch": batch,
        "image_size": 224,
        "tokens_in": 197,
        "method": method,
        "setting": {str(i): {"r": 13} for i in range(12)},
        "proportional_attn": True,
        "tokens_final": 41,
        "op_ms": 1.0,
        "base_ms": 100.0,
        "method_ms": 100.0 / speedup,
        "base_img_s": 10.0,
        "img_s": 10.0 * speedup,
        "speedup": speedup,
        "base_gflops": 8.5,
        "gflops": 5.1,
        "base_peak_mb": peak,
        "peak_mb": None if peak is None else peak / 2,
        **extra,
    }


def vlm_row(method, speedup, keep=64, batch=8, peak=None):
    return {
        "method": method,
        "batch": batch,
        "keep": keep,
        "visual_tokens": 576,
        "base_prefill_ms": 400.0,
        "prefill_ms": 400.0 / speedup,
        "prefill_speedup": speedup,
        "base_tflops": 0.061,
        "tflops": 0.017,
        "peak_mb": peak,
        "base_decode_tok_s": 30.0,
        "decode_tok_s": 35.0,
    }


def meta(device="cpu", repeat=5, **extra):
    return {
        "date": "2026-11-24T06:59:37+00:00",
        "device": {"type": device, "name": "x86_64" if device == "cpu" else "GPU-9", "threads": 2},
        "versions": {"torch": "2.14.1", "python": "3.11.7", "platform": "Linux-test"},
        "dtype": "float32",
        "repeat": repeat,
        "warmup": 1,
        **extra,
    }


def vit_results(device="cpu", peak=None):
    # EViT is faster than ToMe at batch 8 but slower at batch 1: the order follows batch 8.
    rows = [
        vit_row("tome", 1.30, batch=1, peak=peak),
        vit_row("tome", 1.38, batch=8, peak=peak),
        vit_row("evit", 1.10, batch=1, peak=peak),
        vit_row("evit", 1.60, batch=8, peak=peak),
    ]
    return {device: {**meta(device), "results": rows}}


def vlm_results(device="cpu", peak=None):
    host = {
        "vision": {"img_size": 336, "patch_size": 14, "embed_dim": 384},
        "layers": 6,
        "hidden": 768,
        "heads": 12,
    }
    rows = [
        vlm_row("fastv", 2.0, keep=64, peak=peak),
        vlm_row("fastv", 1.5, keep=192, peak=peak),
        vlm_row("trsm", 3.5, keep=64, peak=peak),
        vlm_row("trsm", 2.5, keep=192, peak=peak),
    ]
    data = {**meta(device, repeat=3), "host": host, "prompt": {"prefix": 35, "suffix": 20}}
    return {device: {**data, "decode_steps": 16, "results": rows}}


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def papers(catalog):
    return {p.id: p for p in catalog.papers}


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the Markdown table under ``heading`` (header row included)."""
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


# The comparison page


def test_comparison_names_methods_by_paper_sorts_by_speedup_and_drops_empty_columns(catalog):
    text = benchmarks.comparison_page(catalog, vit_results(), vlm_results())
    rows = table_rows(text, "#### ViT-S/16, 224 px")
    header, body = rows[0], rows[2:]
    # Sorted by the speedup at the largest batch, fastest first; linked by short name.
    assert [r[0] for r in body] == ["[EViT](papers/evit.md)", "[ToMe](papers/tome.md)"]
    assert header[:2] == ["Method", "Setting"] and len(header) == len(body[0])
    # Peak memory is null on the CPU: no column for it anywhere.
    assert "Peak MB" not in text
    assert body[1][1] == r"r=13 at blocks 0-11, proportional attention"
    assert body[1][2] == "197 → 41"
    assert body[0][-1].startswith("**1.60×**")
    # The VLM table: the tightest budget decides the order; PAR's module is provisional.
    vlm = table_rows(text, "#### Batch 8")
    assert vlm[0][0] == "Method" and "Keep 64 of 576" in vlm[0][2]
    assert vlm[2][0] == "[PAR](papers/trsm.md) ([provisional](reference/trsm.md))"
    assert vlm[3][0] == "[FastV](papers/fastv.md)" and "language model" in vlm[3][1]


def test_comparison_keeps_a_peak_column_that_has_values(catalog):
    text = benchmarks.comparison_page(catalog, vit_results("cuda", peak=800.0), {})
    header = table_rows(text, "#### ViT-S/16, 224 px")[0]
    assert "Peak MB, batch 8, dense → reduced" in header
    assert "| 800 → 400 |" in text


def test_comparison_says_where_every_number_came_from(catalog):
    both = {**vit_results("cpu"), **vit_results("cuda")}
    text = benchmarks.comparison_page(catalog, both, vlm_results())
    # One section per device, CPU first; no "pending" line once a GPU run exists.
    assert text.index("### ViT host on CPU { #vit-cpu }") < text.index(
        "### ViT host on CUDA { #vit-cuda }"
    )
    vit, vlm = text.split("\n## LLaVA-style host")
    assert "Pending" not in vit and "Pending" in vlm.split("{ #vlm-cuda }")[1]
    vit_cpu = text.split("{ #vit-cpu }")[1].split("{ #vit-cpu-")[0]
    for fact in ("2026-11-24", "torch 2.14.1", "CPU (x86_64, 2 threads)", "float32"):
        assert fact in vit_cpu
    # Only ViT-S/16 was timed: the command that measures it again names it.
    command = "`python -m tools bench --suite vit --device cpu --models vit_small_patch16_224`"
    assert command in vit_cpu
    assert "](performance/speedup-cpu.png)" in vit_cpu
    # The VLM run used batch 8 only and --repeat 3, not the defaults: the command says so.
    assert "`python -m tools bench --suite vlm --device cpu --batch 8 --repeat 3`" in text


def test_bench_command_matches_the_cli_defaults():
    data = {**meta(), "results": [vit_row("tome", 1.2, batch=b) for b in (1, 8)]}
    data["results"].append(vit_row("tome", 1.2, batch=1, model="vit_base_patch16_224"))
    assert benchmarks.bench_command("vit", data) == "python -m tools bench --suite vit --device cpu"
    data["results"] = data["results"][:1]
    assert benchmarks.bench_command("vit", data).endswith(
        "--models vit_small_patch16_224 --batch 1"
    )


def test_drop_empty_columns():
    cols = (benchmarks.Column("a"), benchmarks.Column("b"), benchmarks.Column("c"))
    table = benchmarks.Table("t", "t", cols, (("1", "—", "x"), ("2", "—", "—")))
    dropped = benchmarks.drop_empty_columns(table)
    assert [c.header for c in dropped.columns] == ["a", "c"]
    assert dropped.rows == (("1", "x"), ("2", "—"))


def test_comparison_page_renders_as_tables(catalog):
    text = benchmarks.comparison_page(catalog, vit_results(), vlm_results())
    html = markdown.markdown(text, extensions=["attr_list", "tables"])
    assert html.count("<table>") == 2  # ViT-S/16; LLaVA host at batch 8
    assert 'id="vit-cpu-vit-small-patch16-224"' in html and 'id="vlm-cpu-batch-8"' in html
    assert '<a href="papers/evit.md">EViT</a>' in html


def test_performance_page_has_only_the_tooling_and_links_the_comparison():
    text = pages.performance_page(paths.CATALOG_BENCH, vit_results(), vlm_results())
    assert text.startswith("# Tooling speed")
    assert "](comparison.md)" in text
    assert "Reference implementations" not in text and "speedup-cpu.png" not in text


def test_performance_page_shows_the_papers_index_timings_when_measured(tmp_path):
    bench = json.loads(paths.CATALOG_BENCH.read_text(encoding="utf-8"))
    bench["machine"]["chromium"] = "not measured: Debian's chromium is not installed"
    for run in bench["runs"]:
        for key in [k for k in run if k.startswith("index_")]:
            del run[key]
    path = tmp_path / "catalog-cpu.json"
    path.write_text(json.dumps(bench), encoding="utf-8")
    text = unescape(pages.performance_page(path, {}, {}))
    assert "Not measured: Debian's chromium is not installed." in text
    bench["machine"]["chromium"] = "131.0"
    bench["runs"][-1].update(index_dom_content_loaded_ms=420.0, index_filter_ms=35.5)
    path.write_text(json.dumps(bench), encoding="utf-8")
    text = pages.performance_page(path, {}, {})
    assert "Chromium 131.0" in text
    assert "| DOMContentLoaded | not measured | 420.0 |" in text
    assert "| One facet change, median | not measured | 35.5 |" in text


# The paper pages


def test_paper_speed_shows_speedup_budget_and_provenance(papers):
    html = benchmarks.paper_speed(papers["tome"], vit_results(), vlm_results())
    assert "ViT-S/16, batch 8: <strong>1.38×</strong> throughput" in html
    assert "197 → 41 tokens (r=13 at blocks 0-11)" in html
    assert "CPU, torch 2.14.1, 2026-11-24" in html
    assert 'href="../../comparison/#vit-cpu"' in html
    vlm = benchmarks.paper_speed(papers["fastv"], vit_results(), vlm_results())
    assert "prefill <strong>2.00×</strong> faster keeping 64 of 576 visual tokens" in vlm
    assert "1.50× keeping 192" in vlm and 'href="../../comparison/#vlm-cpu"' in vlm


def test_paper_speed_is_empty_for_a_paper_not_benchmarked(papers):
    assert benchmarks.paper_speed(papers["a_vit"], vit_results(), vlm_results()) == ""
    assert benchmarks.paper_speed(papers["tome"], {}, {}) == ""


def test_paper_speed_escapes_what_it_shows(papers):
    results = vit_results()
    for row in results["cpu"]["results"]:
        row["setting"] = {"0": {"variant": "<script>alert(1)</script>"}}
    html = benchmarks.paper_speed(papers["tome"], results, {})
    assert "<script>" not in html and "&lt;script&gt;" in html


# The plots


def test_plots_are_labelled_by_paper_names(catalog):
    names = {p.id: p.name for p in catalog.papers}
    chart = rp.speedup_chart(vit_results()["cpu"], names)
    assert chart.labels == ("EViT", "ToMe")  # by mean speedup: 1.35 against 1.34
    assert chart.panels == ("ViT-S/16 (224 px)",) and chart.series == ("batch 1", "batch 8")
    assert chart.values == (((1.10, 1.30), (1.60, 1.38)),)
    vlm = rp.vlm_chart(vlm_results()["cpu"], names)
    assert vlm.labels == ("PAR", "FastV")
    assert vlm.series == ("keep 64 of 576", "keep 192 of 576")
    assert rp.render_chart(chart).startswith(b"\x89PNG\r\n\x1a\n")
    # Without names, the plots read them from the catalog the site is built from.
    assert rp.paper_names()["llava_prumerge"] == names["llava_prumerge"] == "LLaVA-PruMerge"


def test_settings_read_in_words():
    assert rp.describe_setting({str(i): {"r": 13} for i in range(12)}) == "r=13 at blocks 0-11"
    keep = {str(i): {"dim": 384, "keep_ratio": 0.7} for i in (3, 6, 9)}
    assert rp.describe_setting(keep) == "keep 70% at blocks 3, 6, 9"
    schedule = {"0": {"kept": 196, "on": True}, "1": {"kept": 150, "on": True}}
    assert rp.describe_setting(schedule) == "kept from 196 to 150, on on at blocks 0, 1"
    mixed = {"0": {"r": 8}, "1": {"keep_rate": 0.5}}
    assert rp.describe_setting(mixed) == "r=8 at block 0; keep 50% at block 1"


# The reference pages


@pytest.fixture(scope="module")
def modules():
    return {m.name: m for m in rp.read_modules(paths.REFERENCE)}


def test_reference_page_titled_by_name_with_the_docstring_once(modules, papers):
    tome = modules["tome"]
    text = pages.reference_module_page(tome, papers["tome"], vit_results(), {})
    front, body = text.removeprefix("---\n").split("---\n", 1)
    assert 'title: "ToMe: reference/tome.py"' in front
    assert body.lstrip().startswith("# ToMe: `reference/tome.py`")
    first_line = tome.docstring.splitlines()[0]
    assert body.count(first_line) == 1
    assert body.count("Deviations from the official code") == 1
    assert "def bipartite_soft_matching(" in body  # the code is still listed
    html = markdown.markdown(body, extensions=["attr_list", "tables", "pymdownx.superfences"])
    assert re.search(r"<h2 data-search-exclude[^>]*>Source</h2>", html)
    assert "Provisional" not in body


def test_provisional_modules_are_marked_on_their_page_and_in_the_index(modules, catalog, papers):
    trsm = modules["trsm"]
    assert trsm.provisional and not modules["tome"].provisional
    text = pages.reference_module_page(trsm, papers["trsm"], {}, vlm_results())
    body = text.split("---\n", 2)[2]
    assert body.lstrip().startswith("# PAR: `reference/trsm.py` (provisional)\n")
    assert '!!! warning "Provisional implementation"' in text
    index = pages.reference_index_page(catalog, list(modules.values()), "")
    row = {line.split(" | ")[1]: line for line in index.splitlines() if line.startswith("| [")}
    assert "**provisional**" in row["[`trsm`](trsm.md) **provisional**"]
    assert "[`tome`](tome.md)" in row


def test_fixture_tested_modules_say_so_with_the_official_commit(modules, catalog, papers):
    tome = modules["tome"]
    # Every module with official code has a fixture now: take one away to see the other case.
    dynamicvit = dataclasses.replace(modules["dynamicvit"], fixture=None)
    assert tome.fixture["repo"].endswith("facebookresearch/ToMe")
    page = pages.reference_module_page(tome, papers["tome"], {}, vlm_results())
    assert f"at commit `{tome.fixture['commit'][:7]}`" in page
    assert "`tests/reference/fixtures/tome.json`" in page
    other = pages.reference_module_page(dynamicvit, papers["dynamicvit"], {}, vlm_results())
    assert "no golden fixture from it yet" in other
    listed = [dynamicvit if m.name == "dynamicvit" else m for m in modules.values()]
    index = pages.reference_index_page(catalog, listed, "")
    rows = {line.split(" | ")[1]: line for line in index.splitlines() if line.startswith("| [")}
    assert "([golden fixture](tome.md#fidelity))" in rows["[`tome`](tome.md)"]
    assert "golden fixture" not in rows["[`dynamicvit`](dynamicvit.md)"]


def test_source_listing_drops_only_the_module_docstring():
    source = '"""Title.\n\nBody with ``` fences.\n"""\n\nimport os\n\n\ndef f():\n    """Kept."""\n'
    module = rp.Module("m", "m", "", "mid", (), "official code", "", source)
    assert module.code == 'import os\n\n\ndef f():\n    """Kept."""\n'
    assert rp.strip_docstring("import os\n") == "import os\n"
    assert len(module.fence) == 3
    assert len(rp.Module("m", "m", "", "", (), "", "", "x = '````'\n").fence) == 5


# The built site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    env = {**os.environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(target)]
    result = subprocess.run(command, cwd=paths.ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return target


def test_search_index_holds_reference_prose_but_not_source(site, modules):
    index = json.loads((site / "search" / "search_index.json").read_text(encoding="utf-8"))
    docs = [d for d in index["docs"] if d["location"].startswith("reference/tome/")]
    assert {d["location"] for d in docs} == {
        "reference/tome/",
        "reference/tome/#fidelity",
        "reference/tome/#timings",
    }
    text = " ".join(d["text"] for d in index["docs"])
    assert "Bipartite soft matching" in text or "bipartite soft matching" in text  # the docstring
    assert "def bipartite_soft_matching" not in text and "import torch" not in text
    assert all(d.get("boost") == 0.5 for d in docs)  # the paper page ranks first


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_comparison_page_in_chromium(site):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"Chromium not found at {CHROMIUM}")
        pytest.skip("Debian's chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    handler = functools.partial(_Quiet, directory=str(site))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 900})
            context.route(
                "**/*",
                lambda r: (
                    r.continue_() if urlsplit(r.request.url).hostname == "127.0.0.1" else r.abort()
                ),
            )
            page = context.new_page()
            page.goto(url + "/comparison/", wait_until="networkidle")
            # Every table fits the content column: nothing to scroll sideways at 1440 px.
            wide = page.eval_on_selector_all(
                "article .md-typeset__scrollwrap",
                "ws => ws.filter(w => w.scrollWidth > w.clientWidth + 1).length",
            )
            images = page.eval_on_selector_all(
                "article img", "imgs => imgs.map(i => [i.naturalWidth, i.alt])"
            )
            names = page.eval_on_selector_all(
                "article table td:first-child a", "links => links.map(a => a.textContent)"
            )
            page.screenshot(path=str(_shots() / "comparison-1440.png"))
        finally:
            browser.close()
            httpd.shutdown()
            httpd.server_close()
    assert wide == 0
    assert len(images) >= 2 and all(width > 0 and alt for width, alt in images)
    assert "ToMe" in names and "tome" not in names


def _shots() -> Path:
    shots = paths.ROOT / "artifacts" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def test_a_baseline_is_named_as_one_and_links_to_no_paper(catalog):
    from tools.site.benchmarks import _Methods

    methods = _Methods(catalog)
    assert methods.cell("random_pruning") == "Random pruning (baseline)"
    assert methods.cell("no_longer_here") == "`no_longer_here`"


# Projectors


def projector_row(method, tokens_out, ms, setting=None, **extra):
    return {
        "method": method,
        "budget": tokens_out if setting else None,
        "setting": setting or {},
        "tokens_in": 576,
        "tokens_out": tokens_out,
        "params_m": 20.98,
        "base_params_m": 20.98,
        "gflops": 6.04,
        "base_gflops": 24.16,
        "ms": ms,
        "base_ms": 20.0,
        "text_width": None,
        "base_prefill_ms": 300.0,
        "prefill_ms": 150.0,
        "prefill_speedup": 2.0,
        "peak_mb": None,
        **extra,
    }


def projector_results(device="cpu"):
    rows = [
        projector_row("deco", 144, 25.0, {"query_num": 144}),
        projector_row("blip2", 64, 180.0, {"num_query_token": 64}),
        projector_row("deco", 64, 30.0, {"query_num": 64}),
        {
            **projector_row("tokenpacker", 144, 50.0, {"raw_grid": 24, "scale_factor": 2}),
            "prefill_error": "multi_layers (12, 16, 22, 23) need 23 vision layers",
        },
    ]
    del rows[3]["prefill_speedup"]
    skipped = {"fastvlm": "a vision encoder of its own: it takes pixels, not patch features"}
    return {device: {**meta(device), "results": rows, "skipped": skipped}}


def test_comparison_lists_projectors_by_tokens_out_then_cost(catalog):
    text = benchmarks.comparison_page(catalog, {}, {}, projector_results())
    rows = table_rows(text, "#### Projectors at the LLaVA-1.5 shape")
    header, _, *body = rows
    assert header[:2] == ["Method", "Tokens out"] and "Peak MB" not in header
    # 64 tokens before 144; at each count the cheaper compressor first (DeCo's 30 ms before
    # BLIP-2's 180 ms; DeCo's 25 ms before TokenPacker's 50 ms).
    names = [r[0].split("]")[0].lstrip("[") for r in body]
    assert names == ["DeCo", "BLIP-2", "DeCo", "TokenPacker"]
    assert [r[1] for r in body] == ["64", "64", "144", "144"]
    assert body[0][-1].startswith("**2.00×**")
    assert body[3][-1].startswith(r"not run: multi\_layers")  # why the host could not run it
    assert "`fastvlm` (a vision encoder of its own" in text
    assert "docs/benchmarks/projector-cpu.json" in text
    assert "python -m tools bench --suite projector --device cpu" in text


def test_comparison_says_projectors_are_not_measured_yet(catalog):
    text = benchmarks.comparison_page(catalog, {}, {})
    assert "Not measured yet: run `python -m tools bench --suite projector`." in text


def test_paper_page_shows_a_projector_cost_at_each_count(papers):
    html = benchmarks.paper_speed(papers["deco"], {}, {}, projector_results())
    assert "from 576 patch features: 64 tokens: 20.98 M parameters, 30.0 ms" in html
    assert "144 tokens: 20.98 M parameters, 25.0 ms against the MLP's 20.0 ms" in html
    assert 'href="../../comparison/#projector-cpu"' in html
    assert benchmarks.paper_speed(papers["deco"], {}, {}, {}) == ""


def test_reference_page_shows_projector_rows(papers):
    module = next(m for m in rp.read_modules(paths.REFERENCE) if m.catalog_id == "deco")
    text = pages.reference_module_page(module, papers["deco"], {}, {}, projector_results())
    rows = table_rows(text, "## Timings")
    assert rows[0][:3] == ["Device", "Tokens out", "Setting"]
    assert [r[1] for r in rows[2:]] == ["144", "64"]
    assert "python -m tools bench --suite projector" in text


def test_each_reference_page_says_where_its_registered_class_acts():
    """Read statically, the hook follows the registered class's bases through the package
    (PVC's projector subclasses InternVL 1.5's; VoCo-LLaMA acts in the language model)."""
    from reference import registry
    from reference.hosts.llava import LLMReducer, SequenceMethod
    from reference.projector import Projector

    classes = {e.catalog_id: e.cls for e in registry.entries()}
    for module in rp.read_modules(paths.REFERENCE):
        cls = classes[module.catalog_id]
        if issubclass(cls, Projector):
            assert module.where == "projector", module.name
        elif issubclass(cls, LLMReducer | SequenceMethod):
            assert module.where == "llm", module.name
        else:
            assert module.where in ("mid", "pre"), module.name
