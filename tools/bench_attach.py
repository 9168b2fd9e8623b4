"""``python -m tools bench --suite attach``: the cost of ``reference.attach`` itself.

A zero-budget method attached (every token kept) to a copy of the model (the same
weights) against the plain model, the two called in turn in one run (medians;
attaching is not timed): prefill of transformers LLaVA models and the forward of
timm ViTs, at a tiny and a mid-size random-weight configuration. The issue's bar:
within 3% of the plain model.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

import reference
from tools.bench_reference import _sync, run_metadata

LLAVA_SIZES = {
    "tiny": dict(hidden=64, layers=4, vision=32, vision_layers=3, image=32, patch=8),
    "mid": dict(hidden=1024, layers=8, vision=512, vision_layers=6, image=336, patch=14),
}
VIT_SIZES = {
    "tiny": dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4),
    "mid": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
}


def llava(size: str):
    import transformers

    s = LLAVA_SIZES[size]
    vision = transformers.CLIPVisionConfig(
        hidden_size=s["vision"], intermediate_size=4 * s["vision"],
        num_hidden_layers=s["vision_layers"], num_attention_heads=8,
        image_size=s["image"], patch_size=s["patch"], projection_dim=s["vision"],
    )  # fmt: skip
    text = transformers.LlamaConfig(
        hidden_size=s["hidden"], intermediate_size=4 * s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=8, num_key_value_heads=8, vocab_size=1000,
        max_position_embeddings=2048,
    )  # fmt: skip
    n_image = (s["image"] // s["patch"]) ** 2
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=999,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=n_image,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    ids = torch.cat([torch.arange(2), torch.full((n_image,), 999), torch.arange(2, 22)])[None]
    pixels = torch.randn(1, 3, s["image"], s["image"])
    return model, {"input_ids": ids, "pixel_values": pixels}, n_image


def interleaved(model, call, attach, repeat: int, device) -> tuple[float, float]:
    """Median ms of ``call(model)`` on the plain model and on a copy of it (the same
    weights) with ``attach(copy)``'s method in place, attached once and called in turn
    with the plain model: the steady-state cost of the attached method, drift shared."""
    twin = copy.deepcopy(model)
    handle = attach(twin)
    a, b = [], []
    for _ in range(repeat):
        for subject, out in ((model, a), (twin, b)):
            _sync(device)
            start = time.perf_counter()
            call(subject)
            _sync(device)
            out.append((time.perf_counter() - start) * 1e3)
    handle.detach()
    return statistics.median(a), statistics.median(b)


@torch.no_grad()
def run_attach(repeat: int = 20, warmup: int = 2) -> dict:
    import timm

    device = torch.device("cpu")
    rows = []
    for size in LLAVA_SIZES:
        model, inputs, n_image = llava(size)

        def call(subject, inputs=inputs):
            subject(**inputs)

        def keep_all(subject, n=n_image):
            return reference.attach(subject, "random_pruning", keep=n)  # keeps every token

        interleaved(model, call, keep_all, warmup, device)
        base, ours = interleaved(model, call, keep_all, repeat, device)
        rows.append({"model": f"transformers LLaVA ({size})", "visual_tokens": n_image,
                     "plain_ms": base, "attached_ms": ours, "ratio": ours / base})  # fmt: skip
    for size, shape in VIT_SIZES.items():
        torch.manual_seed(0)
        vit = timm.models.vision_transformer.VisionTransformer(**shape).eval()
        x = torch.randn(8, 3, shape["img_size"], shape["img_size"])

        def forward(subject, x=x):
            subject(x)

        def no_merge(subject):
            return reference.attach(subject, "tome", r=0)

        interleaved(vit, forward, no_merge, warmup, device)
        base, ours = interleaved(vit, forward, no_merge, repeat, device)
        rows.append({"model": f"timm ViT ({size}), batch 8", "plain_ms": base,
                     "attached_ms": ours, "ratio": ours / base})  # fmt: skip
    import transformers

    meta = run_metadata(device, torch.float32, repeat, warmup)
    meta["versions"]["transformers"] = transformers.__version__
    meta["versions"]["timm"] = timm.__version__
    what = (
        "a zero-budget method attached to a copy of the model vs the plain model, called in "
        "turn (attaching not timed)"
    )
    return {**meta, "what": what, "results": rows}
