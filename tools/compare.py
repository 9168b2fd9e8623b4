"""``python -m tools compare``: every method at every budget on one local LLaVA checkpoint.

Loads a transformers ``LlavaForConditionalGeneration`` from a ``save_pretrained``
folder (no hub access), puts each method on it with ``reference.attach`` at each
budget (visual tokens kept, through the method's ``bench_setting``), and measures, on
the same inputs and timed alternately with the dense model in one run: visual tokens
kept, prefill latency and decode tokens/s (medians), peak memory (CUDA), prefill
FLOPs (counted by ``torch.utils.flop_counter``), agreement with the dense model
(next-token top-1 agreement and the KL divergence of the first answer token) and,
when answers are given, accuracy (the normalised answer found in the generated
text). Writes a JSON file (device, versions, shapes) and a plot, and prints a table.

Without ``--images``/``--questions`` the inputs are random images and prompts of
the checkpoint's shapes (seeded); with them, the checkpoint's processor builds them.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import reference
from reference import registry
from tools.bench_reference import _sync, run_metadata


@dataclass
class Inputs:
    batches: list[dict]  # model keyword arguments, one dict per batch
    answers: list[str] | None  # one per sample, or None
    n_image: int


def load_model(path: str, device: str, dtype: str):
    from transformers import LlavaForConditionalGeneration

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{path}: not a save_pretrained checkpoint folder (no config.json)")
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            folder, local_files_only=True, dtype=getattr(torch, dtype)
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: cannot load a LLaVA checkpoint: {exc}") from exc
    return model.to(device).eval()


def synthetic_inputs(model, samples: int, batch: int, text: int = 12, seed: int = 0) -> Inputs:
    """Random images and prompts: ``[2 tokens][image run][text tokens]`` per sample."""
    cfg = model.config
    n_image = cfg.image_seq_length
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision_config.image_size
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    vocab = cfg.text_config.vocab_size
    batches = []
    for start in range(0, samples, batch):
        b = min(batch, samples - start)
        ids = torch.randint(0, vocab - 1, (b, 2 + text), generator=g)
        ids[ids >= cfg.image_token_id] += 1  # never the placeholder itself
        image = torch.full((b, n_image), cfg.image_token_id)
        input_ids = torch.cat([ids[:, :2], image, ids[:, 2:]], 1).to(device)
        pixels = torch.randn(b, 3, size, size, generator=g).to(device, dtype)
        mask = torch.ones_like(input_ids)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels})
    return Inputs(batches, None, n_image)


def dataset_inputs(path: str, images: str, questions: str, batch: int, n_image: int) -> Inputs:
    """``questions``: JSON lines ``{"image": file in images, "question": ..., "answer": ...}``."""
    from PIL import Image
    from transformers import AutoProcessor

    rows = []
    for number, line in enumerate(Path(questions).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{questions}:{number}: not JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{questions}:{number}: expected an object with image and question")
        for field in ("image", "question"):
            if not isinstance(row.get(field), str) or not row[field]:
                raise ValueError(f"{questions}:{number}: {field}: missing or not a string")
        rows.append(row)
    if not rows:
        raise ValueError(f"{questions}: no questions")
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: --questions needs the checkpoint's processor: {exc}") from exc
    batches, answers = [], []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        pictures = [Image.open(Path(images) / row["image"]).convert("RGB") for row in chunk]
        prompts = [f"USER: <image>\n{row['question']} ASSISTANT:" for row in chunk]
        encoded = processor(images=pictures, text=prompts, return_tensors="pt", padding=True)
        batches.append(dict(encoded))
        answers += [str(row.get("answer", "")) for row in chunk]
    return Inputs(batches, answers if any(answers) else None, n_image)


def _time(func, device) -> float:
    _sync(device)
    start = time.perf_counter()
    func()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _prefill(model, kwargs):
    with torch.no_grad():
        return model(**kwargs).logits


def _generate(model, kwargs, steps: int):
    with torch.no_grad():
        return model.generate(**kwargs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)


def measure(model, inputs: Inputs, steps: int, repeat: int, device, peers=None) -> dict:
    """Medians of prefill ms and decode tok/s; FLOPs, memory and first-token distribution.

    ``peers``: a dense measurement to interleave with (its timing lists grow too)."""
    first, prefill, decode = [], [], []
    for kwargs in inputs.batches:
        first.append(_prefill(model, kwargs)[:, -1].float().softmax(-1))
    for _ in range(repeat):
        for kwargs in inputs.batches:
            if peers is not None:
                peers["time"](kwargs)
            prefill.append(_time(lambda kwargs=kwargs: _prefill(model, kwargs), device))
            one = _time(lambda kwargs=kwargs: _generate(model, kwargs, 1), device)
            many = _time(lambda kwargs=kwargs: _generate(model, kwargs, steps), device)
            batch = kwargs["input_ids"].shape[0]
            decode.append((steps - 1) * batch * 1e3 / max(many - one, 1e-6))
    with FlopCounterMode(display=False) as counter:
        _prefill(model, inputs.batches[0])
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _prefill(model, inputs.batches[0])
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    return {
        "prefill_ms": statistics.median(prefill) if prefill else math.nan,
        "decode_tok_s": statistics.median(decode) if decode else math.nan,
        "gflops": counter.get_total_flops() / 1e9,
        "peak_mb": peak,
        "first": torch.cat(first),
    }


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


def accuracy(model, inputs: Inputs, steps: int, processor_path: str) -> float | None:
    if inputs.answers is None:
        return None
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(processor_path, local_files_only=True).tokenizer
    hits, i = 0, 0
    for kwargs in inputs.batches:
        out = _generate(model, kwargs, steps)[:, -steps:]
        for text in tokenizer.batch_decode(out, skip_special_tokens=True):
            hits += _normalise(inputs.answers[i]) in _normalise(text)
            i += 1
    return hits / max(i, 1)


def kept_tokens(handle, image_id: int) -> float | None:
    patch = getattr(handle, "patch", None)
    mask = getattr(patch, "last_attention_mask", None)
    ids = getattr(patch, "last_input_ids", None)
    if mask is None or ids is None:
        return None
    return float(((ids == image_id) & (mask > 0)).sum(1).float().mean())


def run(args) -> dict:
    from tqdm import tqdm

    for name in ("samples", "batch", "new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.repeat < 0:
        raise ValueError(f"--repeat must be >= 0, got {args.repeat}")
    device = torch.device(args.device)
    model = load_model(args.model, args.device, args.dtype)
    if args.questions:
        inputs = dataset_inputs(
            args.model, args.images or ".", args.questions, args.batch,
            model.config.image_seq_length,
        )  # fmt: skip
    else:
        inputs = synthetic_inputs(model, args.samples, args.batch)
    methods = [m for m in args.methods.split(",") if m]
    budgets = [int(b) for b in args.budget.split(",") if b]
    known = {e.catalog_id: e.cls for e in registry.entries()}
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"--methods: no reference implementation for {', '.join(unknown)}")
    if any(b < 1 for b in budgets):
        raise ValueError(f"--budget must be positive token counts, got {args.budget}")
    cfg = SimpleNamespace(layers=model.config.text_config.num_hidden_layers)
    dense_times: list[float] = []

    def dense_time(kwargs):
        dense_times.append(_time(lambda: _prefill(model, kwargs), device))

    dense = measure(model, inputs, args.new_tokens, 0, device)
    dense_acc = accuracy(model, inputs, args.new_tokens, args.model)
    rows = []
    pairs = [(m, b) for m in methods for b in budgets]
    for method, keep in tqdm(pairs, desc="compare", unit="run", disable=args.quiet):
        row = {
            "method": method,
            "keep": keep,
            "baseline": bool(getattr(known[method], "baseline", False)),
        }
        setting = getattr(known[method], "bench_setting", None)
        if setting is None:
            rows.append({**row, "refused": "the method has no budget setting (bench_setting)"})
            continue
        placed = setting(keep, inputs.n_image, cfg)
        if "vision" in placed:
            instance, layers = placed["vision"], None
        else:
            (layer, instance), *rest = placed["llm"].items()
            layers = [layer] + [k for k, _ in rest]
        try:
            handle = reference.attach(model, instance, **({"layers": layers} if layers else {}))
        except ValueError as exc:
            rows.append({**row, "refused": str(exc).removeprefix("attach: ")})
            continue
        with handle:
            got = measure(model, inputs, args.new_tokens, args.repeat, device, {"time": dense_time})
            acc = accuracy(model, inputs, args.new_tokens, args.model)
            kept = kept_tokens(handle, model.config.image_token_id)
        p, q = dense["first"], got["first"]
        kl = (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1)
        rows.append(
            {
                **row,
                "visual_tokens": kept,
                "prefill_ms": got["prefill_ms"],
                "decode_tok_s": got["decode_tok_s"],
                "gflops": got["gflops"],
                "peak_mb": got["peak_mb"],
                "top1_agreement": float((p.argmax(-1) == q.argmax(-1)).float().mean()),
                "kl_first_token": float(kl.mean()),
                "accuracy": acc,
            }
        )
    base_ms = statistics.median(dense_times) if dense_times else math.nan
    for row in rows:
        if "prefill_ms" in row:
            row["prefill_speedup"] = base_ms / row["prefill_ms"]
    import transformers

    meta = run_metadata(device, next(model.parameters()).dtype, args.repeat, 0)
    meta["versions"]["transformers"] = transformers.__version__
    text = model.config.text_config
    return {
        **meta,
        "model": str(args.model),
        "shapes": {
            "visual_tokens": inputs.n_image,
            "samples": sum(b["input_ids"].shape[0] for b in inputs.batches),
            "batch": args.batch,
            "prompt_tokens": int(inputs.batches[0]["input_ids"].shape[1]),
            "new_tokens": args.new_tokens,
            "llm_layers": text.num_hidden_layers,
            "llm_hidden": text.hidden_size,
        },
        "dense": {
            "prefill_ms": base_ms,
            "decode_tok_s": dense["decode_tok_s"],
            "gflops": dense["gflops"],
            "peak_mb": dense["peak_mb"],
            "accuracy": dense_acc,
        },
        "results": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"dense: prefill {result['dense']['prefill_ms']:.2f} ms, "
        f"{result['dense']['gflops']:.3f} GFLOPs",
        "| method | keep | visual tokens | prefill x | decode tok/s | GFLOPs | top-1 | KL | acc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def f(value, spec: str) -> str:
        return (
            "-"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else format(value, spec)
        )

    for row in result["results"]:
        name = row["method"] + (" (baseline)" if row["baseline"] else "")
        if "refused" in row:
            lines.append(f"| {name} | {row['keep']} | refused: {row['refused']} |||||||")
            continue
        lines.append(
            f"| {name} | {row['keep']} | {f(row['visual_tokens'], '.1f')} | "
            f"{f(row['prefill_speedup'], '.2f')} | {f(row['decode_tok_s'], '.1f')} | "
            f"{f(row['gflops'], '.3f')} | {f(row['top1_agreement'], '.2f')} | "
            f"{f(row['kl_first_token'], '.4f')} | {f(row['accuracy'], '.2f')} |"
        )
    return "\n".join(lines)


def plot(result: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if "refused" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["keep"])
        keeps = [r["keep"] for r in mine]
        axes[0].plot(keeps, [r["prefill_speedup"] for r in mine], marker="o", label=method)
        axes[1].plot(keeps, [r["top1_agreement"] for r in mine], marker="o", label=method)
    axes[0].set(xlabel="visual tokens kept", ylabel="prefill speedup vs dense")
    axes[1].set(xlabel="visual tokens kept", ylabel="next-token top-1 agreement", ylim=(0, 1.05))
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{Path(result['model']).name} on {result['device']['name']}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
