"""``python -m tools compare``: every method at every budget on one local VLM checkpoint.

Loads a transformers model of a family ``reference.attach`` supports (LLaVA-1.5,
LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL: chosen by the folder's ``config.json``
``model_type``) from a ``save_pretrained`` folder (``local_files_only``; no hub
access), puts each method on it with ``reference.attach`` at each budget (visual
tokens kept, through the method's ``bench_setting``), and measures, on the same
inputs and timed alternately with the dense model in one run: visual tokens kept,
prefill latency and decode tokens/s (medians), peak memory (CUDA), prefill FLOPs
(counted by ``torch.utils.flop_counter``), agreement with the dense model (next-token
top-1 agreement and the KL divergence of the first answer token) and, when answers
are given, accuracy (the normalised answer found in the generated text). Writes a
JSON file (device, versions, shapes) and a plot, and prints a table.

The budget counts the tokens a vision-stage method keeps per vision-tower forward:
per image on LLaVA-1.5 and Qwen-VL, per crop on LLaVA-NeXT (its base image and each
AnyRes tile, as the official VisionZip code budgets it). A language-model method gets
the same total: ``budget x crops`` of the image's placeholder tokens. The
``visual_tokens`` column reports what the language model then saw.

Without ``--images``/``--questions`` the inputs are random images and prompts of
the checkpoint's shapes (seeded): LLaVA-1.5 one crop, LLaVA-NeXT an image of its
first ``image_grid_pinpoints`` resolution (``image_sizes``; base crop and tiles),
Qwen-VL a 24x24 grid of merged tokens (``image_grid_thw``; 576 tokens, LLaVA-1.5's
count). With them, the checkpoint's processor builds them (its chat template when
it has one).
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
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

import reference
from reference import registry
from tools.bench_reference import _sync, run_metadata


@dataclass
class Inputs:
    batches: list[dict]  # model keyword arguments, one dict per batch
    answers: list[str] | None  # one per sample, or None
    n_image: int  # image placeholder tokens of the first sample
    per_crop: int = 0  # tokens of one vision-tower forward (0: n_image)
    crops: int = 1  # vision-tower forwards per image (LLaVA-NeXT: base crop and tiles)


# config.json model_type -> the transformers class ``reference.attach`` supports
FAMILIES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def model_family(path: str) -> str:
    """The ``model_type`` of a ``save_pretrained`` folder, if ``reference.attach`` takes it."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{path}: not a save_pretrained checkpoint folder (no config.json)")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: config.json is not readable JSON: {exc}") from exc
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in FAMILIES:
        names = config.get("architectures") if isinstance(config, dict) else None
        raise ValueError(
            f"{path}: model_type {kind!r} (architectures {names}) is not a family "
            f"reference.attach supports; supported model_type: {', '.join(FAMILIES)}"
        )
    return kind


def load_model(path: str, device: str, dtype: str):
    import transformers

    kind = model_family(path)
    cls = getattr(transformers, FAMILIES[kind])
    try:
        model = cls.from_pretrained(Path(path), local_files_only=True, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: cannot load a {FAMILIES[kind]} checkpoint: {exc}") from exc
    return model.to(device).eval()


def _prompts(cfg, b: int, n_image: int, text: int, g, around=()) -> Tensor:
    """``[b, 2 + len(around) + n_image + text]``: 2 random tokens, the image run (inside
    ``around``'s start and end tokens), ``text`` random tokens; never a special id."""
    vocab = cfg.text_config.vocab_size
    special = {cfg.image_token_id, *around, getattr(cfg, "video_token_id", None)} - {None}
    special = sorted(special)
    ids = torch.randint(0, vocab - len(special), (b, 2 + text), generator=g)
    for value in special:  # shift past each special id: none is drawn
        ids[ids >= value] += 1
    image = torch.full((b, n_image), cfg.image_token_id)
    start = torch.tensor(list(around[:1])).expand(b, -1).long()
    end = torch.tensor(list(around[1:])).expand(b, -1).long()
    return torch.cat([ids[:, :2], start, image, end, ids[:, 2:]], 1)


def synthetic_inputs(model, samples: int, batch: int, text: int = 12, seed: int = 0) -> Inputs:
    """Random images and prompts: ``[2 tokens][image run][text tokens]`` per sample."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    kind = cfg.model_type
    batches, n_image, per_crop, crops = [], 0, 0, 1
    for start in range(0, samples, batch):
        b = min(batch, samples - start)
        if kind in ("qwen2_vl", "qwen2_5_vl"):
            v = cfg.vision_config
            side = 24 * v.spatial_merge_size  # patches per side: 24x24 merged tokens
            n_image = per_crop = 24 * 24
            around = (cfg.vision_start_token_id, cfg.vision_end_token_id)
            input_ids = _prompts(cfg, b, n_image, text, g, around)
            width = v.in_channels * v.temporal_patch_size * v.patch_size**2
            pixels = torch.randn(b * side * side, width, generator=g)
            extra = {
                "image_grid_thw": torch.tensor([[1, side, side]] * b, device=device),
                "mm_token_type_ids": (input_ids == cfg.image_token_id).int().to(device),
            }
        elif kind == "llava_next":
            size = cfg.vision_config.image_size
            height, width = cfg.image_grid_pinpoints[0]
            crops = 1 + (height // size) * (width // size)
            pixels = torch.randn(b, crops, 3, size, size, generator=g)
            sizes = torch.tensor([[height, width]] * b)
            if not n_image:  # the model's own count: base crop, unpadded tiles, newlines
                with torch.no_grad():
                    feats = model.model.get_image_features(
                        pixels[:1].to(device, dtype), sizes[:1].to(device), return_dict=True
                    )
                n_image = int(feats.pooler_output[0].shape[0])
            per_crop = (size // cfg.vision_config.patch_size) ** 2
            input_ids = _prompts(cfg, b, n_image, text, g)
            extra = {"image_sizes": sizes.to(device)}
        else:
            n_image = per_crop = cfg.image_seq_length
            size = cfg.vision_config.image_size
            input_ids = _prompts(cfg, b, n_image, text, g)
            pixels = torch.randn(b, 3, size, size, generator=g)
            extra = {}
        input_ids = input_ids.to(device)
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "pixel_values": pixels.to(device, dtype),
                **extra,
            }
        )
    return Inputs(batches, None, n_image, per_crop, crops)


def dataset_inputs(path: str, images: str, questions: str, batch: int, model) -> Inputs:
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
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # as generate wants a batch
    param = next(model.parameters())
    batches, answers = [], []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        pictures = [Image.open(Path(images) / row["image"]).convert("RGB") for row in chunk]
        prompts = [_prompt(processor, row["question"]) for row in chunk]
        encoded = processor(images=pictures, text=prompts, return_tensors="pt", padding=True)
        batches.append(
            {
                k: v.to(param.device, param.dtype if v.is_floating_point() else None)
                if isinstance(v, Tensor)
                else v
                for k, v in encoded.items()
            }
        )
        answers += [str(row.get("answer", "")) for row in chunk]
    cfg = model.config
    first = batches[0]["input_ids"][0]
    n_image = int((first == cfg.image_token_id).sum())
    per_crop, crops = n_image, 1
    if cfg.model_type == "llava_next":  # the base crop and the first image's tiles
        per_crop = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        from reference.adapters.hf_llava_next import crops_per_image

        crops = crops_per_image(model, batches[0]["image_sizes"][:1].tolist())[0]
    return Inputs(batches, answers if any(answers) else None, n_image, per_crop, crops)


def _prompt(processor, question: str) -> str:
    """The question with one image, in the processor's chat template if it has one."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


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
    first, prefill = [], []
    ones: list[list[float]] = [[] for _ in inputs.batches]  # ms of generate(1), per batch
    manys: list[list[float]] = [[] for _ in inputs.batches]  # ms of generate(steps)
    for kwargs in inputs.batches:
        first.append(_prefill(model, kwargs)[:, -1].float().softmax(-1))
    for _ in range(repeat):
        for j, kwargs in enumerate(inputs.batches):
            if peers is not None:
                peers["time"](kwargs)
            prefill.append(_time(lambda kwargs=kwargs: _prefill(model, kwargs), device))
            ones[j].append(_time(lambda kwargs=kwargs: _generate(model, kwargs, 1), device))
            manys[j].append(_time(lambda kwargs=kwargs: _generate(model, kwargs, steps), device))
    # decoding time: the medians' difference, so one noisy pair cannot make it negative
    decoded = sum((steps - 1) * kwargs["input_ids"].shape[0] for kwargs in inputs.batches)
    pairs = zip(ones, manys, strict=True)
    spent = sum(statistics.median(m) - statistics.median(o) for o, m in pairs if o)
    decode_tok_s = decoded * 1e3 / spent if repeat and decoded and spent > 0 else math.nan
    with FlopCounterMode(display=False) as counter:
        _prefill(model, inputs.batches[0])
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _prefill(model, inputs.batches[0])
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    return {
        "prefill_ms": statistics.median(prefill) if prefill else math.nan,
        "decode_tok_s": decode_tok_s,
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


def kept_tokens(handle, image_id: int, model=None, batch: dict | None = None) -> float | None:
    """Mean image tokens per sample that the language model saw: after the prompt cut of a
    vision-stage method, or after the last drop of a language-model method (one prefill
    of ``batch`` followed through the patch's ``last_trace``)."""
    patch = getattr(handle, "patch", None)
    mask = getattr(patch, "last_attention_mask", None)
    ids = getattr(patch, "last_input_ids", None)
    if mask is not None and ids is not None:
        return float(((ids == image_id) & (mask > 0)).sum(1).float().mean())
    if model is None or batch is None or not hasattr(patch, "last_trace"):
        return None
    _prefill(model, batch)
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    seen = (ids == image_id) & (torch.ones_like(ids) if mask is None else mask).bool()
    for index in patch.last_trace:  # each drop indexes the sequence entering it
        seen = seen.gather(1, index)
    return float(seen.sum(1).float().mean())


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
        inputs = dataset_inputs(args.model, args.images or ".", args.questions, args.batch, model)
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
        try:
            placed = setting(keep, inputs.per_crop or inputs.n_image, cfg)
            if "llm" in placed and inputs.crops > 1:  # the same total as the vision stage's
                placed = setting(min(keep * inputs.crops, inputs.n_image), inputs.n_image, cfg)
        except ValueError as exc:
            rows.append({**row, "refused": f"no setting at this budget: {exc}"})
            continue
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
            kept = kept_tokens(handle, model.config.image_token_id, model, inputs.batches[0])
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
        "family": model.config.model_type,
        "shapes": {
            "visual_tokens": inputs.n_image,
            "crops_per_image": inputs.crops,
            "tokens_per_crop": inputs.per_crop or inputs.n_image,
            "budget": "visual tokens kept per vision-tower forward (per crop)",
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
        f"dense {result.get('family', '')}: prefill {result['dense']['prefill_ms']:.2f} ms, "
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
