"""``python -m tools bench --suite memory``: FastV's peak memory, sdpa against eager.

FastV scores image tokens by the last token's attention row; under ``sdpa`` the
adapter computes that one row and never an ``N x N`` map. This suite shows it: a
mid-size random transformers LLaVA (576 image tokens, 609 in all), one prefill with
and without FastV (K = 2, half the image tokens kept) under each attention
implementation, batch 1 and 4. Each case runs in its own process; the peak is the
process's resident high-water mark during the prefill above its resident size just
before (Linux ``/proc``: the mark is reset through ``clear_refs``), or on CUDA
``max_memory_allocated``. The largest single allocation comes from the profiler, next
to the size of one layer's ``[B, H, N, N]`` float32 map for comparison.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

IMAGE_TOKEN, N_IMAGE = 31999, 576
HEADS = 16
CASES = [(a, m, b) for b in (1, 4) for a in ("sdpa", "eager") for m in ("plain", "fastv")]


def build(attn: str):
    import torch
    import transformers

    vision = transformers.CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        image_size=336, patch_size=14, projection_dim=256,
    )  # fmt: skip
    text = transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=32000,
        max_position_embeddings=2048,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=N_IMAGE,
    )  # fmt: skip
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval(), text


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def one_case(attn: str, method: str, batch: int, device_name: str) -> dict:
    """One prefill's peak memory (run in a fresh process: see ``run_memory``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import reference

    device = torch.device(device_name)
    model = build(attn)[0].to(device)
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * N_IMAGE + list(range(10, 40))] * batch)
    pixels = torch.randn(batch, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    inputs = dict(
        input_ids=ids.to(device), pixel_values=pixels.to(device), use_cache=True, logits_to_keep=1
    )
    handle = reference.attach(model, "fastv", ratio=0.5) if method == "fastv" else None
    with torch.no_grad():
        model(**inputs)  # warm-up
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            model(**inputs)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            before = _status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
            model(**inputs)
            peak = _status("VmHWM") - before
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities, profile_memory=True) as prof:
            model(**inputs)
    usage = "device_memory_usage" if device.type == "cuda" else "cpu_memory_usage"
    largest = max(((getattr(e, usage), e.name) for e in prof.events()), default=(0, ""))
    if handle is not None:
        handle.detach()
    n = ids.shape[1]
    return {
        "attn": attn,
        "method": method,
        "batch": batch,
        "sequence": n,
        "visual_tokens": N_IMAGE,
        "peak_mib": round(peak / 2**20, 1),
        "largest_allocation_mib": round(largest[0] / 2**20, 1),
        "largest_allocation_op": largest[1],
        "one_attention_map_mib": round(batch * HEADS * n * n * 4 / 2**20, 1),
    }


def run_memory(device_name: str = "cpu") -> dict:
    import torch
    import transformers

    from tools.bench_reference import run_metadata

    if device_name == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise ValueError("--suite memory on the CPU needs Linux's /proc/self/clear_refs")
    rows = []
    for attn, method, batch in CASES:
        out = subprocess.run(
            [sys.executable, "-m", "tools.bench_memory", attn, method, str(batch), device_name],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            check=False,
        )
        if out.returncode != 0:
            why = out.stderr[-500:]
            raise ValueError(f"--suite memory: the {attn} {method} case failed: {why}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    meta = run_metadata(torch.device(device_name), torch.float32, 1, 1)
    meta["versions"]["transformers"] = transformers.__version__
    model, text = build("sdpa")
    del model
    shape = f"Llama {text.num_hidden_layers} layers, width {text.hidden_size}, {HEADS} heads"
    return {
        **meta,
        "model": f"random transformers LLaVA: {shape}; CLIP 2 layers at 336 px, 14 px patches",
        "method": "reference.attach(model, 'fastv', ratio=0.5): K = 2, 288 of 576 image tokens",
        "results": rows,
    }


if __name__ == "__main__":  # one case, in its own process
    attn, method, batch, device = sys.argv[1:5]
    print(json.dumps(one_case(attn, method, int(batch), device)))
