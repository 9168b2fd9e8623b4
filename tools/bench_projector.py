"""Projector part of ``python -m tools bench``: what each projector costs at a budget.

At LLaVA-1.5's shape, 576 patch features of CLIP ViT-L/14 at 336 px (width 1024)
in and Vicuna-7B's width (4096) out, every registered ``Projector`` runs at each
budget it can reach (``Projector.count_setting``; 64 and 144 tokens), or at its
paper's own count when it reaches neither. Per row: tokens out, parameters,
FLOPs, and the compressor's latency against LLaVA-1.5's two-layer MLP projector
(576 tokens out), the two timed alternately in one run; then the whole prefill
of the LLaVA host with the projector in place of its MLP, against the host with
its MLP (on the CPU the host keeps LLaVA-1.5's token counts at reduced widths,
as the ``vlm`` suite does, and a multi-level projector takes its levels scaled to the
shallower tower; on CUDA it has LLaVA-1.5-7B's shapes). Random text
features stand in for a text encoder (text-guided projectors). A projector that
cannot run on such inputs is listed under ``skipped`` with the reason.
"""

from __future__ import annotations

import inspect
import statistics
from dataclasses import asdict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from reference import registry
from reference.hosts.llava import LLAVA_15_7B, LlavaConfig, LlavaHost
from reference.projector import Projector, ProjectorSignals
from tools.bench_reference import run_metadata, time_ms
from tools.bench_vlm import LLAVA_CPU, _inputs

N_IMAGE, GRID = 576, (24, 24)  # CLIP ViT-L/14 at 336 px
IN_DIM, OUT_DIM, DEPTH = 1024, 4096, 24  # its width and depth; Vicuna-7B's width
BUDGETS = (64, 144)
TEXT = 8  # tokens of random text features


def settings(cls: type[Projector]) -> list[tuple[int | None, dict]]:
    """``(budget, constructor arguments)`` for each budget ``cls`` reaches; when it
    reaches none, ``[(None, {})]``: its paper's own count."""
    found = []
    for keep in BUDGETS:
        setting = cls.count_setting(keep, N_IMAGE)
        if setting is None:
            continue
        try:
            with torch.device("meta"):  # only the count: nothing is allocated
                count = cls(in_dim=IN_DIM, out_dim=OUT_DIM, **setting).num_tokens(N_IMAGE)
        except (ValueError, TypeError):
            continue
        if count == keep:
            found.append((keep, setting))
    return found or [(None, {})]


def _mlp(in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA-1.5's ``mlp2x_gelu`` projector."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def _features(batch: int, device, dtype) -> tuple[torch.Tensor, ProjectorSignals]:
    g = torch.Generator().manual_seed(0)
    layer = torch.randn(batch, 1 + N_IMAGE, IN_DIM, generator=g).to(device, dtype)
    text = torch.randn(batch, TEXT, IN_DIM, generator=g).to(device, dtype)
    signals = ProjectorSignals(layers=(layer,) * DEPTH, grid=GRID, state={"text": text})
    return layer[:, 1:], signals


def _first_run(projector, features, signals) -> tuple[torch.Tensor, ProjectorSignals]:
    """The output, and the signals it ran with: random text features of the vision
    width, else of the language model's width (a projector that reads the LLM's
    embeddings), else no text (one that wants token ids or its own encoder's width)."""
    text = signals.state["text"]
    wide = torch.randn(*text.shape[:2], OUT_DIM, generator=torch.Generator().manual_seed(2))
    states = ({"text": text}, {"text": wide.to(text)}, {})
    for i, state in enumerate(states):
        tried = ProjectorSignals(layers=signals.layers, grid=signals.grid, state=state)
        try:
            return projector(features, tried), tried
        except (ValueError, RuntimeError):
            if i == len(states) - 1:
                raise
    raise AssertionError  # unreachable


def _flops(func) -> float:
    with FlopCounterMode(display=False) as counter:
        func()
    return counter.get_total_flops() / 1e9


def _alternate(first, second, device, repeat: int, warmup: int) -> tuple[float, float]:
    """Median ms of ``first`` and of ``second``, timed in turn so drift hits both alike."""
    time_ms(first, device, 0, warmup)
    time_ms(second, device, 0, warmup)
    a, b = [], []
    for _ in range(repeat):
        a.append(time_ms(first, device, 1, 0))
        b.append(time_ms(second, device, 1, 0))
    return statistics.median(a), statistics.median(b)


def _scaled_levels(cls, depth: int) -> dict:
    """For a multi-level projector (``multi_layers``: 1-based levels of CLIP-L's 24) on a
    host whose tower runs ``depth`` blocks: the same levels scaled to that depth."""
    default = inspect.signature(cls).parameters.get("multi_layers")
    if default is None or depth >= DEPTH:
        return {}
    levels = tuple(max(1, round(level * depth / DEPTH)) for level in default.default)
    return {"multi_layers": levels}


def _prefill(
    cls, setting: dict, host: LlavaHost, args, width, device, dtype, repeat, warmup
) -> dict:
    """The host's prefill with ``cls`` in place of its MLP, against the MLP. Text, for a
    projector that took text of ``width``: the host's features of the matching width
    (its vision tower's or its language model's), else of ``width`` itself (a width the
    projector fixes), else none."""
    cfg = host.cfg
    setting = {**setting, **_scaled_levels(cls, cfg.vision_layer + 1)}
    projector = cls(in_dim=cfg.vision["embed_dim"], out_dim=cfg.hidden, **setting)
    projector = projector.to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    own = {IN_DIM: cfg.vision["embed_dim"], OUT_DIM: cfg.hidden}.get(width, width)
    widths = list(dict.fromkeys([own, width])) if width else []
    texts = [torch.randn(1, TEXT, w, generator=g).to(device, dtype) for w in widths] + [None]

    def run(projector=None, text=None):
        host.apply(projector=projector)
        return host.prefill(*args, state={} if text is None else {"text": text})

    for i, text in enumerate(texts):
        try:
            run(projector, text)
            break
        except (ValueError, RuntimeError, IndexError) as exc:  # e.g. layers the host lacks
            host.apply()
            if i == len(texts) - 1:
                return {"prefill_error": str(exc).splitlines()[0][:200]}
    base_ms, ms = _alternate(run, lambda: run(projector, text), device, repeat, warmup)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        run(projector, text)
        peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    host.apply()
    return {
        "prefill_setting": setting,
        "base_prefill_ms": round(base_ms, 2),
        "prefill_ms": round(ms, 2),
        "prefill_speedup": round(base_ms / ms, 3),
        "peak_mb": peak,
    }


def run_projector(
    device_name: str, pattern: str, repeat: int, warmup: int, progress: bool = True
) -> dict:
    from tqdm import tqdm

    device = torch.device(device_name)
    cfg: LlavaConfig = LLAVA_15_7B if device.type == "cuda" else LLAVA_CPU
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    host = LlavaHost(cfg).to(device, dtype).eval()
    args = _inputs(1, cfg, device, dtype)
    features, signals = _features(1, device, dtype)
    mlp = _mlp(IN_DIM, OUT_DIM).to(device, dtype).eval()
    entries = [e for e in registry.entries(pattern) if issubclass(e.cls, Projector)]
    skipped = {
        e.catalog_id: "a vision encoder of its own: it takes pixels, not patch features"
        for e in entries
        if e.cls.takes != "features"
    }
    plan = [
        (e, keep, setting)
        for e in entries
        if e.catalog_id not in skipped
        for keep, setting in settings(e.cls)
    ]
    rows = []
    with torch.no_grad():
        base_gflops = _flops(lambda: mlp(features))
        for entry, keep, setting in tqdm(plan, desc="bench projector", disable=not progress):
            projector = entry.cls(in_dim=IN_DIM, out_dim=OUT_DIM, **setting).to(device, dtype)
            projector.eval()
            try:
                out, used = _first_run(projector, features, signals)
            except (ValueError, RuntimeError) as exc:
                skipped[entry.catalog_id] = str(exc).splitlines()[0][:200]
                continue
            width = used.state["text"].shape[-1] if "text" in used.state else None
            base_ms, ms = _alternate(
                lambda: mlp(features),
                lambda p=projector, s=used: p(features, s),
                device,
                repeat,
                warmup,
            )
            rows.append(
                {
                    "method": entry.catalog_id,
                    "budget": keep,
                    "setting": setting,
                    "tokens_in": N_IMAGE,
                    "tokens_out": out.shape[1],
                    "params_m": round(sum(p.numel() for p in projector.parameters()) / 1e6, 2),
                    "base_params_m": round(sum(p.numel() for p in mlp.parameters()) / 1e6, 2),
                    "gflops": round(_flops(lambda p=projector, s=used: p(features, s)), 3),
                    "text_width": width,
                    "base_gflops": round(base_gflops, 3),
                    "ms": round(ms, 3),
                    "base_ms": round(base_ms, 3),
                    **_prefill(
                        entry.cls,
                        setting,
                        host,
                        args,
                        width,
                        device,
                        dtype,
                        repeat,
                        warmup,
                    ),
                }
            )
            del projector
    return {
        **run_metadata(device, dtype, repeat, warmup),
        "compressor": {"tokens_in": N_IMAGE, "grid": list(GRID), "in_dim": IN_DIM},
        "compressor_out_dim": OUT_DIM,
        "host": asdict(cfg),
        "budgets": list(BUDGETS),
        "batch": 1,
        "results": rows,
        "skipped": skipped,
    }
