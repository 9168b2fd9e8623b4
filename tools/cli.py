"""``python -m tools``: validate the catalog and generate everything from it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
from pathlib import Path

from tools import paths
from tools.files import DOCUMENT_LIMIT, UnreadableFile, describe_os_error, read_text
from tools.loader import Catalog, load_catalog
from tools.problems import CatalogInvalid
from tools.render_readme import ReadmeError, render_readme
from tools.schema import SLUG
from tools.writeout import write_all, write_atomic


def _load(args) -> Catalog:
    return load_catalog(Path(args.catalog), Path(args.reference))


def _stale(path: Path, text: str) -> bool:
    try:
        return read_text(path, DOCUMENT_LIMIT) != text
    except UnreadableFile:
        return True


def cmd_validate(args) -> int:
    start = time.perf_counter()
    catalog = _load(args)
    targets = {t: sum(p.target == t for p in catalog.papers) for t in catalog.taxonomy.target}
    split = ", ".join(f"{n} {t}" for t, n in targets.items())
    print(
        f"{args.catalog}: {len(catalog.entries)} papers ({split}) valid "
        f"in {time.perf_counter() - start:.2f} s"
    )
    return 0


def _readme_text(args, catalog: Catalog) -> str:
    """The README re-rendered, with the line endings the file has (LF or CRLF)."""
    readme = Path(args.readme)
    try:
        current = read_text(readme, DOCUMENT_LIMIT)
    except UnreadableFile as exc:
        raise ReadmeError(f"{readme}: {exc}") from exc
    newline = "\r\n" if "\r\n" in current else "\n"
    rendered = render_readme(current.replace("\r\n", "\n"), catalog)
    return rendered.replace("\n", newline)


def _schema_text(catalog: Catalog) -> str:
    from tools.json_schema import render_json_schema

    return render_json_schema(catalog.taxonomy)


def _outputs(args, catalog: Catalog) -> dict[Path, str]:
    """Every generated file and its new content, computed before anything is written."""
    outputs = {
        Path(args.catalog) / paths.SCHEMA_FILENAME: _schema_text(catalog),
        Path(args.readme): _readme_text(args, catalog),
    }
    return outputs


def _write_or_check(outputs: dict[Path, str], check: bool) -> int:
    if check:
        stale = [path for path, text in outputs.items() if _stale(path, text)]
        for path in stale:
            print(f"{path} is stale: run `python -m tools build`", file=sys.stderr)
        return 1 if stale else 0
    for path, changed in write_all(outputs).items():
        print(f"{path}: {'written' if changed else 'unchanged'}")
    return 0


def cmd_render(args) -> int:
    catalog = _load(args)
    return _write_or_check({Path(args.readme): _readme_text(args, catalog)}, args.check)


def cmd_schema(args) -> int:
    catalog = _load(args)
    path = Path(args.catalog) / paths.SCHEMA_FILENAME
    return _write_or_check({path: _schema_text(catalog)}, args.check)


def cmd_build(args) -> int:
    catalog = _load(args)
    print(f"{args.catalog}: {len(catalog.entries)} papers valid")
    return _write_or_check(_outputs(args, catalog), args.check)


def cmd_export(args) -> int:
    catalog = _load(args)
    if args.format == "json":
        from tools.export_json import render_json as render
    else:
        from tools.export_bibtex import render_bibtex as render
    text = render(catalog)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        write_atomic(Path(args.output), text)
        print(f"{args.output}: {len(catalog.entries)} papers", file=sys.stderr)
    return 0


def _bad_id(paper_id: str) -> int:
    print(
        f"error: --id {paper_id!r} is not a catalog id: lower-case letters, digits and "
        "underscores, starting with a letter, at most 64 characters (e.g. llava_prumerge); "
        "nothing was written",
        file=sys.stderr,
    )
    return 1


def cmd_new(args) -> int:
    from tools.scaffold import fetch_arxiv, parse_arxiv_id, render_template, slug_for

    arxiv_id = parse_arxiv_id(args.arxiv)
    catalog = _load(args)
    for paper in catalog.papers:
        if paper.arxiv == arxiv_id:
            print(
                f"error: arXiv {arxiv_id} is already in the catalog as {paper.id}", file=sys.stderr
            )
            return 1
    if args.id is not None and not re.fullmatch(SLUG, args.id):
        return _bad_id(args.id)
    meta = None if args.offline else fetch_arxiv(arxiv_id)
    if meta is None:
        print("arXiv API not reached: writing a template with the unknowns marked", file=sys.stderr)
    paper_id = args.id or slug_for(meta.title if meta else None, arxiv_id)
    if not re.fullmatch(SLUG, paper_id):
        return _bad_id(paper_id)
    path = Path(args.catalog) / paths.PAPERS_DIRNAME / f"{paper_id}.yaml"
    if os.path.lexists(path) or paper_id in {p.id for p in catalog.papers}:
        print(f"error: {path} exists; pick another --id", file=sys.stderr)
        return 1
    write_atomic(path, render_template(paper_id, arxiv_id, meta, dt.date.today()))
    print(f"{path}: fill in the TODOs, then run `python -m tools build`")
    return 0


def cmd_refs(args) -> int:
    from reference import registry

    for entry in registry.entries(args.pattern):
        print(f"{entry.catalog_id}\t{entry.module}\t{entry.kind}")
    return 0


def cmd_bench(args) -> int:
    from tools.bench_reference import run as run_bench

    suites = set(args.suite.split(","))
    device_kind = args.device.split(":")[0]
    unknown = suites - {"vit", "vlm", "projector", "attach", "memory"}
    if unknown:
        raise ValueError(
            f"--suite: unknown suite(s) {', '.join(sorted(unknown))}; "
            "choose from vit, vlm, projector, attach, memory"
        )
    if "memory" in suites:
        from tools.bench_memory import run_memory

        memory = run_memory(args.device)
        memory_out = paths.DOCS / "benchmarks" / f"memory-{device_kind}.json"
        write_atomic(memory_out, json.dumps(memory, indent=2) + "\n")
        for row in memory["results"]:
            print(
                f"{row['attn']:6} {row['method']:6} b{row['batch']}  "
                f"peak {row['peak_mib']:8.1f} MiB"
                f"  largest allocation {row['largest_allocation_mib']:6.1f} MiB "
                f"({row['largest_allocation_op']}; one N x N map: {row['one_attention_map_mib']})"
            )
        print(f"{memory_out}: written")
    if "attach" in suites:
        from tools.bench_attach import run_attach

        attach = run_attach(max(args.repeat, 5) * 4, args.warmup + 1)
        attach_out = paths.DOCS / "benchmarks" / "attach-cpu.json"
        write_atomic(attach_out, json.dumps(attach, indent=2) + "\n")
        for row in attach["results"]:
            print(
                f"{row['model']:32} plain {row['plain_ms']:8.2f} ms  attached "
                f"{row['attached_ms']:8.2f} ms  x{row['ratio']:.3f}"
            )
        print(f"{attach_out}: written")
    if "vlm" in suites:
        from tools.bench_vlm import run_vlm

        vlm = run_vlm(
            args.device,
            tuple(int(b) for b in args.batch.split(",")),
            args.methods,
            args.repeat,
            args.warmup,
        )
        vlm_out = paths.DOCS / "benchmarks" / f"vlm-{device_kind}.json"
        write_atomic(vlm_out, json.dumps(vlm, indent=2) + "\n")
        for row in vlm["results"]:
            print(
                f"{row['method']:22} b{row['batch']:<3} keep {row['keep']:>3}/"
                f"{row['visual_tokens']}  prefill x{row['prefill_speedup']:.2f}  "
                f"{row['base_tflops']:.3f} -> {row['tflops']:.3f} TFLOPs  decode "
                f"{row['base_decode_tok_s']:.1f} -> {row['decode_tok_s']:.1f} tok/s"
            )
        print(f"{vlm_out}: written")
    if "projector" in suites:
        from tools.bench_projector import run_projector

        proj = run_projector(args.device, args.methods, args.repeat, args.warmup)
        proj_out = paths.DOCS / "benchmarks" / f"projector-{device_kind}.json"
        write_atomic(proj_out, json.dumps(proj, indent=2) + "\n")
        for row in proj["results"]:
            print(
                f"{row['method']:16} {row['tokens_in']} -> {row['tokens_out']:>3} tokens  "
                f"{row['params_m']:8.2f} M params  {row['base_ms']:7.2f} -> {row['ms']:7.2f} ms  "
                f"prefill x{row.get('prefill_speedup', float('nan')):.2f}"
            )
        for method, why in proj["skipped"].items():
            print(f"{method:16} skipped: {why}")
        print(f"{proj_out}: written")
    if "vit" not in suites:
        return 0
    output = Path(
        args.output or paths.DOCS / "benchmarks" / f"reference-{args.device.split(':')[0]}.json"
    )
    result = run_bench(
        args.device,
        tuple(args.models.split(",")),
        tuple(int(b) for b in args.batch.split(",")),
        args.methods,
        args.repeat,
        args.warmup,
        output,
    )
    for row in result["results"]:
        print(
            f"{row['model']:24} b{row['batch']:<3} {row['method']:22} "
            f"{row['base_img_s']:8.1f} -> {row['img_s']:8.1f} img/s  x{row['speedup']:.2f}  "
            f"op {row['op_ms']:.3f} ms  {row['base_gflops']:.1f} -> {row['gflops']:.1f} GFLOPs"
        )
    print(f"{output}: written")
    return 0


def cmd_compare(args) -> int:
    from tools.compare import plot, run, table

    result = run(args)
    output = Path(args.output)
    figure = output.with_suffix(".png")
    write_all({output: json.dumps(result, indent=2) + "\n", figure: plot(result)})
    print(table(result))
    print(f"{output}: written\n{figure}: written")
    return 0


def cmd_bench_catalog(args) -> int:
    from tools.bench_catalog import run

    run(args.papers, args.repeat, Path(args.output) if args.output else None, site=not args.no_site)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools",
        description="Validate the token-compression catalog and generate the README, "
        "JSON Schema and exports from it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--catalog",
            default=str(paths.CATALOG),
            metavar="DIR",
            help="catalog directory (default: %(default)s)",
        )
        p.add_argument(
            "--reference",
            default=str(paths.REFERENCE),
            metavar="DIR",
            help="reference implementations directory (default: %(default)s)",
        )
        p.set_defaults(func=func)
        return p

    command(
        "validate",
        "Check every entry; print all problems as path:line: field: message.",
        cmd_validate,
    )
    for name, help_text, func in (
        ("render", "Render the paper list into README.md's generated regions.", cmd_render),
        ("build", "Validate, then regenerate the JSON Schema and README.md.", cmd_build),
    ):
        p = command(name, help_text, func)
        p.add_argument(
            "--readme",
            default=str(paths.README),
            metavar="FILE",
            help="README to update (default: %(default)s)",
        )
        p.add_argument(
            "--check",
            action="store_true",
            help="write nothing; exit 1 if a generated file is stale",
        )
    p = command("schema", "Write catalog/paper.schema.json (JSON Schema for editors).", cmd_schema)
    p.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the schema file is stale"
    )
    p = command("export", "Export the whole catalog as JSON or BibTeX.", cmd_export)
    p.add_argument("--format", required=True, choices=("json", "bibtex"))
    p.add_argument("-o", "--output", metavar="FILE", help="output file (default: stdout)")
    p = command("new", "Scaffold catalog/papers/<id>.yaml for an arXiv paper.", cmd_new)
    p.add_argument("--arxiv", required=True, metavar="ID", help="arXiv id or abs/pdf URL")
    p.add_argument("--id", help="catalog id (default: derived from the title)")
    p.add_argument("--offline", action="store_true", help="do not call the arXiv API")
    p = sub.add_parser(
        "bench",
        help="Time the reference implementations on the ViT host (writes a results file).",
        description="Time each method's operator and the host's throughput with and without "
        "it, at ViT-S/16 and ViT-B/16 224 shapes, in the paper's setting; FLOPs and (CUDA) "
        "peak memory. Results go to docs/benchmarks/reference-<device>.json.",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    p.add_argument("--batch", default="1,8", help="batch sizes (default: %(default)s)")
    p.add_argument("--methods", default="*", help="catalog ids to time (wildcards)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="discarded runs before each timing")
    p.add_argument("-o", "--output", metavar="FILE", help="ViT results file")
    p.add_argument(
        "--suite",
        default="vit,vlm,projector",
        help="vit (ViT host), vlm (LLaVA host), projector (projectors at LLaVA-1.5's "
        "shape against its MLP), attach (the cost of reference.attach on transformers and "
        "timm models), memory (FastV's peak memory under sdpa and eager), comma-separated "
        "(default: %(default)s)",
    )
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser(
        "compare",
        help="Run methods at budgets on a local VLM checkpoint; table, JSON and plot.",
        description="Put every method at every budget on one local transformers checkpoint "
        "(LLaVA-1.5, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL; a save_pretrained folder; nothing "
        "is downloaded) and measure, on the "
        "same inputs and alternately with the dense model: visual tokens kept, prefill "
        "latency, decode tokens/s, FLOPs, peak memory (CUDA), next-token agreement, the KL "
        "of the first answer token, and accuracy when answers are given.",
    )
    p.add_argument("--model", required=True, metavar="PATH", help="save_pretrained folder")
    p.add_argument("--methods", required=True, help="catalog ids, comma-separated")
    p.add_argument(
        "--budget",
        default="64,128,192",
        help="visual tokens kept per vision-tower forward (LLaVA-NeXT: per crop) "
        "(default: %(default)s)",
    )
    p.add_argument("--images", metavar="DIR", help="folder of the questions' images")
    p.add_argument("--questions", metavar="FILE", help='JSON lines {"image", "question", "answer"}')
    p.add_argument("--samples", type=int, default=4, help="random inputs without --questions")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=8, help="decoded tokens per sample")
    p.add_argument("--repeat", type=int, default=3, help="timed runs (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument(
        "-o",
        "--output",
        default="compare.json",
        metavar="FILE",
        help="JSON results; the plot goes beside it as .png (default: %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser(
        "refs",
        help="List the reference implementations: id, module, kind (tab-separated).",
        description="List the registered reference implementations as "
        "catalog-id<TAB>module<TAB>kind.",
    )
    p.add_argument("pattern", nargs="?", default="*", help="catalog ids to list (wildcards)")
    p.set_defaults(func=cmd_refs)
    p = sub.add_parser(
        "bench-catalog",
        help="Time validate, render, export, the site build and the papers index.",
        description="Time validate, render and export on the real catalog and on a "
        "generated one (medians of --repeat runs after one warm-up), the whole site build, "
        "and the papers index in Chromium (DOMContentLoaded, one filter change).",
    )
    p.add_argument("--papers", type=int, default=5000, help="size of the generated catalog")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per step")
    p.add_argument("-o", "--output", metavar="FILE", help="write the results as JSON")
    p.add_argument("--no-site", action="store_true", help="skip the mkdocs build timings")
    p.set_defaults(func=cmd_bench_catalog)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CatalogInvalid as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s); nothing was written", file=sys.stderr)
        return 1
    except (ReadmeError, ValueError) as exc:  # WriteError, ScaffoldError, UnreadableFile, ...
        print(f"error: {exc}", file=sys.stderr)
        print("nothing was written", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{describe_os_error(exc)}", file=sys.stderr)
        return 1
