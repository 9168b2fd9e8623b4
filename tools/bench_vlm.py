"""VLM part of ``python -m tools bench``: prefill and decode on the LLaVA-style host.

For each method with a ``bench_setting`` and each budget (visual tokens kept of
576), in one run: prefill latency against keeping all tokens (timed alternately,
medians, ratio), prefill FLOPs, peak memory on CUDA, and decode tokens/s with
the pruned KV cache. On the CPU the host has LLaVA-1.5's token counts (576
visual tokens, a 35-token system prompt, a 20-token instruction) but reduced
widths; on CUDA it has LLaVA-1.5-7B's shapes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from reference import registry
from reference.hosts.llava import LLAVA_15_7B, LlavaConfig, LlavaHost, bench_setting
from tools.bench_reference import _sync, run_metadata, time_ms

# CPU stand-in: LLaVA-1.5's sequence (576 visual tokens from a 336 px, /14 tower;
# a 35-token system prompt and a 20-token instruction) with narrow, shallow
# layers, so that a whole sweep runs in minutes on two cores.
LLAVA_CPU = LlavaConfig(
    vision=dict(img_size=336, patch_size=14, embed_dim=384, depth=4, num_heads=6, num_classes=0),
    vision_layer=2,
    hidden=768,
    layers=6,
    heads=12,
    kv_heads=12,
    intermediate=2048,
    vocab=32000,
)
PREFIX, SUFFIX, DECODE_STEPS = 35, 20, 16
BUDGETS = (64, 128, 192)


def _inputs(batch: int, cfg: LlavaConfig, device, dtype):
    g = torch.Generator().manual_seed(0)
    size = cfg.vision["img_size"]
    images = torch.randn(batch, 3, size, size, generator=g).to(device, dtype)
    prefix = torch.randint(0, cfg.vocab, (batch, PREFIX), generator=g).to(device)
    suffix = torch.randint(0, cfg.vocab, (batch, SUFFIX), generator=g).to(device)
    valid = torch.ones(batch, SUFFIX, dtype=torch.bool, device=device)
    return images, prefix, suffix, valid


def run_vlm(
    device_name: str,
    batches: tuple[int, ...],
    pattern: str,
    repeat: int,
    warmup: int,
    progress: bool = True,
) -> dict:
    from tqdm import tqdm

    device = torch.device(device_name)
    cfg = LLAVA_15_7B if device.type == "cuda" else LLAVA_CPU
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    n_image = (cfg.vision["img_size"] // cfg.vision["patch_size"]) ** 2
    torch.manual_seed(0)
    host = LlavaHost(cfg).to(device, dtype).eval()
    entries = [
        e
        for e in registry.entries(pattern)
        if bench_setting(e.cls, BUDGETS[0], n_image, cfg) is not None
    ]
    rows = []
    bar = tqdm(
        total=len(batches) * len(entries) * len(BUDGETS),
        desc="bench vlm",
        disable=not progress,
        unit="cfg",
    )
    with torch.no_grad():
        for batch in batches:
            args = _inputs(batch, cfg, device, dtype)

            text = torch.randn(
                batch, 8, cfg.vision["embed_dim"], generator=torch.Generator().manual_seed(1)
            ).to(device, dtype)

            def prefill(args=args, text=text):
                # Random text features stand in for a text encoder (text-guided methods).
                return host.prefill(*args, state={"text": text})

            def decode_rate(prefill=prefill, batch=batch) -> float:
                """Tokens/s of greedy decoding with the (pruned) cache of one prefill."""
                logits, cache = prefill()
                token = logits.argmax(-1)
                _sync(device)
                start = time.perf_counter()
                for _ in range(DECODE_STEPS):
                    token = host.decode(token, cache).argmax(-1)
                _sync(device)
                return batch * DECODE_STEPS / (time.perf_counter() - start)

            host.apply()
            with FlopCounterMode(display=False) as counter:
                prefill()
            base_flops = counter.get_total_flops() / 1e12
            base_decode = decode_rate()
            for entry in entries:
                for keep in BUDGETS:
                    bar.set_postfix_str(f"b{batch} {entry.catalog_id} keep {keep}")
                    setting = bench_setting(entry.cls, keep, n_image, cfg)
                    for module in [setting.get("vision"), *setting.get("llm", {}).values()]:
                        if module is not None:
                            module.to(device, dtype).eval()
                    for config in ({}, setting):  # discarded warm-up of both
                        host.apply(**config)
                        time_ms(prefill, device, 0, warmup)
                    base_times, times = [], []
                    for _ in range(repeat):  # alternate, so drift hits both alike
                        host.apply()
                        base_times.append(time_ms(prefill, device, 1, 0))
                        host.apply(**setting)
                        times.append(time_ms(prefill, device, 1, 0))
                    with FlopCounterMode(display=False) as counter:
                        prefill()
                    peak = None
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        prefill()
                        peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                    decode = decode_rate()
                    host.apply()
                    base_ms, ms = statistics.median(base_times), statistics.median(times)
                    rows.append(
                        {
                            "method": entry.catalog_id,
                            "batch": batch,
                            "keep": keep,
                            "visual_tokens": n_image,
                            "base_prefill_ms": round(base_ms, 2),
                            "prefill_ms": round(ms, 2),
                            "prefill_speedup": round(base_ms / ms, 3),
                            "base_tflops": round(base_flops, 4),
                            "tflops": round(counter.get_total_flops() / 1e12, 4),
                            "peak_mb": peak,
                            "base_decode_tok_s": round(base_decode, 1),
                            "decode_tok_s": round(decode, 1),
                        }
                    )
                    bar.update()
    bar.close()
    return {
        **run_metadata(device, dtype, repeat, warmup),
        "host": asdict(cfg),
        "prompt": {"prefix": PREFIX, "suffix": SUFFIX},
        "decode_steps": DECODE_STEPS,
        "results": rows,
    }
