"""``python -m tools bench``: time every reference implementation on the ViT host.

For each host shape and batch size, in one run: the method's operator alone
(median ms per call, the first reducing layer fed the full token count), the host's forward
with and without the method in the paper's setting (images/s and the speedup
as a ratio of the two medians, timed alternately so drift hits both), FLOPs
(``torch.utils.flop_counter``) and, on CUDA, peak memory. Warm-up runs are
discarded and the device is synchronised before every clock read. Results go
to a JSON file with the device, versions, shapes and settings.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from reference import registry
from reference.core import Signals, TokenReducer
from reference.hosts import vit

MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")


def run_metadata(device: torch.device, dtype: torch.dtype, repeat: int, warmup: int) -> dict:
    """Date, device, versions and timing protocol stored next to every result."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": {
            "type": device.type,
            "name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "dtype": str(dtype).removeprefix("torch."),
        "repeat": repeat,
        "warmup": warmup,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(func, device: torch.device, repeat: int, warmup: int) -> float:
    """Median wall-clock milliseconds of ``func()`` after ``warmup`` discarded runs."""
    for _ in range(warmup):
        func()
    _sync(device)
    if repeat == 0:
        return float("nan")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gflops(model: torch.nn.Module, images: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops() / 1e9


def peak_mb(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # no allocator statistics for the CPU
    torch.cuda.reset_peak_memory_stats(device)
    model(images)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def build_reducers(
    entry: registry.Entry, depth: int, dim: int
) -> tuple[dict[int, TokenReducer], bool, dict]:
    setting, proportional = entry.cls.paper_setting(depth, dim)
    reducers = {layer: entry.cls(**kwargs).eval() for layer, kwargs in setting.items()}
    return reducers, proportional, {str(k): v for k, v in setting.items()}


def operator_ms(
    host: vit.VisionTransformer,
    reducers: dict[int, TokenReducer],
    images,
    device,
    repeat: int,
    warmup: int,
) -> float:
    """The first reducer that removes tokens, alone, on its block's input at full length."""
    n = host.patch_embed.num_patches + 1
    reducing = {k: r for k, r in reducers.items() if r.budget(n, 1)[1] < n}
    layer, reducer = min((reducing or reducers).items())
    with torch.no_grad():
        x = host.patch_embed(images)
        x = torch.cat([host.cls_token.expand(x.shape[0], -1, -1), x], 1) + host.pos_embed
        block = host.blocks[layer]
        size = x.new_ones(x.shape[0], x.shape[1], 1)
        signals: dict = {}
        if reducer.where == "mid":
            out, signals = block.attn(block.norm1(x), None, reducer.needs)
            x = x + out
        sig = Signals(prefix=1, size=size, layer=layer, **signals)
        return time_ms(
            lambda: reducer(x, Signals(**{**sig.__dict__, "state": {}})), device, repeat, warmup
        )


def run(
    device_name: str,
    models: tuple[str, ...],
    batches: tuple[int, ...],
    pattern: str,
    repeat: int,
    warmup: int,
    output: Path | None,
    progress: bool = True,
) -> dict:
    from tqdm import tqdm

    device = torch.device(device_name)
    entries = [
        e
        for e in registry.entries(pattern)
        if issubclass(e.cls, TokenReducer) and e.cls.paper_setting(12, 384)[0]
    ]
    dtype = torch.float32
    rows = []
    jobs = [(m, b, e) for m in models for b in batches for e in entries]
    bar = tqdm(total=len(jobs), desc="bench", disable=not progress, unit="cfg")
    for model_name in models:
        torch.manual_seed(0)
        host = vit.create(model_name).to(device, dtype).eval()
        depth = len(host.blocks)
        for batch in batches:
            images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
            with torch.no_grad():
                vit.apply(host, {})
                base_gflops = gflops(host, images[:1])
                base_peak = peak_mb(host, images, device)
                for entry in entries:
                    bar.set_postfix_str(f"{model_name} b{batch} {entry.catalog_id}")
                    reducers, proportional, setting = build_reducers(entry, depth, host.embed_dim)
                    for reducer in reducers.values():
                        reducer.to(device, dtype).eval()
                    op = operator_ms(host, reducers, images, device, repeat, warmup)
                    base_times, method_times = [], []
                    forward = functools.partial(host, images)
                    for config in ({}, reducers):  # discarded warm-up of both
                        vit.apply(host, config, proportional)
                        time_ms(forward, device, 0, warmup)
                    for _ in range(repeat):  # alternate, so drift affects both alike
                        vit.apply(host, {})
                        base_times.append(time_ms(forward, device, 1, 0))
                        vit.apply(host, reducers, proportional)
                        method_times.append(time_ms(forward, device, 1, 0))
                    method_gflops = gflops(host, images[:1])
                    tokens_final = vit.tokens_after(host)[-1]
                    method_peak = peak_mb(host, images, device)
                    vit.apply(host, {})
                    base_ms, method_ms = (
                        statistics.median(base_times),
                        statistics.median(method_times),
                    )
                    rows.append(
                        {
                            "model": model_name,
                            "batch": batch,
                            "image_size": 224,
                            "tokens_in": host.patch_embed.num_patches + 1,
                            "method": entry.catalog_id,
                            "setting": setting,
                            "proportional_attn": proportional,
                            "tokens_final": tokens_final,
                            "op_ms": round(op, 4),
                            "base_ms": round(base_ms, 3),
                            "method_ms": round(method_ms, 3),
                            "base_img_s": round(batch * 1e3 / base_ms, 2),
                            "img_s": round(batch * 1e3 / method_ms, 2),
                            "speedup": round(base_ms / method_ms, 3),
                            "base_gflops": round(base_gflops, 3),
                            "gflops": round(method_gflops, 3),
                            "base_peak_mb": base_peak and round(base_peak, 1),
                            "peak_mb": method_peak and round(method_peak, 1),
                        }
                    )
                    bar.update()
    bar.close()
    result = {**run_metadata(device, dtype, repeat, warmup), "results": rows}
    if output:
        from tools.writeout import write_atomic

        write_atomic(output, json.dumps(result, indent=2) + "\n")
    return result
