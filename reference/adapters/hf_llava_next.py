"""Token reduction inside a transformers ``LlavaNextForConditionalGeneration`` (AnyRes).

LLaVA-NeXT encodes an image as crops: the base image (resized to the CLIP input) and
``h x w`` tiles of the image at the best grid resolution (``image_grid_pinpoints``),
each through the CLIP tower. ``pack_image_features`` then puts the base image's
tokens first and lays the tiles' tokens out as one ``(h * side) x (w * side)`` grid,
cut to the image's aspect ratio ("unpad") and followed by an ``image_newline`` token
per row. The adapter reuses LLaVA-1.5's (``reference.adapters.hf_llava``): the patch
of ``forward``/``generate``, the vision hook, the prompt cut and the re-padding.

Where a method acts (as the official code on LLaVA-NeXT, VisionZip's
``CLIPVisionTower_VisionZip.forward``): at the vision hook of every CLIP forward,
i.e. per crop. All crops of the batch go through the tower as one batch
``x [crops, 1 + N, C]`` (CLS as protected prefix), so a method budgets each crop on
its own, the base image and every tile alike. A projector method replaces the
projector per crop in the same way.

Layout after a reduction (a reduced tile has no grid left). Official code: VisionZip's
``restore_image_features_sorted`` puts the base image's tokens first, then each tile's
kept (dominant) tokens scattered back to their patches of the tiles' joint grid and
read in its row-major order, then the tiles' CLS tokens, then their merged
(contextual) tokens; it skips the unpad cut, and computes the ``image_newline``
tokens but drops them. Here: the base image's tokens in the method's order; then
every tile token that continues a patch (``Reduction.index >= 0``: a kept token,
or a merge's destination, as VisionZip's contextual tokens are here) at that patch
in the joint grid, row-major; then the tokens the method made (``index == -1``),
tile by tile; no unpad cut, no newline tokens (CLS is dropped, the ``"default"``
strategy). A projector method's tokens follow the crop order (no grid is known).
Tiles the method left whole (every patch kept, in order: a zero budget) get the
model's own ``pack_image_features`` (the unpadded grid with its newline tokens), so a
zero budget gives the plain model's logits exactly. A single-crop image keeps its
newline token, as in both. Each sample's placeholder run is then cut to its own
count, the batch re-padded, and positions count the kept tokens (``hf_llava``).

Language-model methods run in the decoder through ``reference.adapters.hf_llava_llm``
on the unreduced sequence (newline tokens count as image tokens there, as the
placeholders they fill); its limits apply, e.g. the same number of image tokens in
every sample of a batch, so images of one size. A vision-stage and a language-model
method are not attached together (the decoder would no longer see the placeholders).

Limits (refused with the reason): one image per sample, ``image_sizes`` with
``pixel_values``, a CLIP tower, an integer ``vision_feature_layer`` and the
``"default"`` feature strategy (transformers' own tile layout needs CLS dropped).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reference.adapters import hf_llava


def matches(model: nn.Module) -> bool:
    try:
        from transformers import LlavaNextForConditionalGeneration
    except ImportError:  # transformers not installed: no model can be one
        return False
    return isinstance(model, LlavaNextForConditionalGeneration)


def unsupported(model: nn.Module) -> str | None:
    reason = hf_llava.unsupported(model)
    if reason is None and model.config.vision_feature_select_strategy != "default":
        reason = (
            f"vision_feature_select_strategy {model.config.vision_feature_select_strategy!r}: "
            "LLaVA-NeXT lays its tiles out without CLS ('default') only"
        )
    return reason


def crops_per_image(model: nn.Module, sizes: list) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    return [
        image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
        for s in sizes
    ]


def pack(
    model: nn.Module, tokens: Tensor, valid: Tensor, index: Tensor | None, size: list[int]
) -> Tensor:
    """One image's tokens ``[K, hidden]`` from its crops (base first).

    Args:
        tokens: ``[crops, M, hidden]`` projected tokens; valid: ``[crops, M]``.
        index: ``[crops, M]`` the patch each token continues (row-major in its
            crop), -1 for a made one; None after a projector method.
        size: the image's ``(height, width)`` (``image_sizes``).
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    config, newline = model.config, model.model.image_newline
    base = tokens[0][valid[0]]
    if tokens.shape[0] == 1:
        return torch.cat([base, newline[None].to(base)])
    tiles, keep, side = tokens[1:], valid[1:], config.vision_config.image_size
    side //= config.vision_config.patch_size
    n = side * side
    whole = torch.arange(n, device=tokens.device).expand(tiles.shape[0], n)
    untouched = index is not None and tiles.shape[1] == n and bool(keep.all())
    if untouched and torch.equal(index[1:], whole):  # the model's own unpad and newlines
        grid, _ = model.model.pack_image_features(
            [torch.cat([tiles[:1], tiles])],  # a stand-in base crop, cut off again below
            torch.tensor([size]),
            config.vision_feature_select_strategy,
            image_newline=newline,
        )
        return torch.cat([base, grid[0][n:]])
    if index is None:
        return torch.cat([base, tiles[keep]])
    pinpoints, crop = config.image_grid_pinpoints, config.vision_config.image_size
    rows, cols = get_anyres_image_grid_shape(size, pinpoints, crop)
    if rows * cols != tiles.shape[0]:
        raise ValueError(f"attach: {tiles.shape[0]} tiles for a {rows}x{cols} grid")
    idx = index[1:]
    tile = torch.arange(tiles.shape[0], device=idx.device)[:, None]
    row = (tile // cols) * side + idx.clamp(min=0) // side
    col = (tile % cols) * side + idx.clamp(min=0) % side
    placed, made = keep & (idx >= 0), keep & (idx < 0)
    order = (row * cols * side + col)[placed].argsort(stable=True)
    return torch.cat([base, tiles[placed][order], tiles[made]])


class Patch(hf_llava.Patch):
    """LLaVA-1.5's patch with LLaVA-NeXT's crops and layout (``image_tokens``)."""

    def image_tokens(self, pixel_values: Tensor, kwargs: dict) -> list[Tensor]:
        sizes = kwargs.pop("image_sizes", None)
        if sizes is None:
            raise ValueError("attach: LLaVA-NeXT needs image_sizes with pixel_values")
        sizes = sizes.tolist() if isinstance(sizes, Tensor) else [list(s) for s in sizes]
        counts = crops_per_image(self.model, sizes)
        if pixel_values.dim() == 5:  # [images, most crops, 3, H, W], padded with empty crops
            if pixel_values.shape[0] != len(counts):
                raise ValueError(
                    f"attach: {pixel_values.shape[0]} images of pixel_values, "
                    f"{len(counts)} image_sizes"
                )
            pixel_values = torch.cat([p[:c] for p, c in zip(pixel_values, counts, strict=True)])
        elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(counts):
            raise ValueError(
                f"attach: pixel_values {tuple(pixel_values.shape)} do not hold the "
                f"{sum(counts)} crops of image_sizes {sizes}"
            )
        tokens, valid, index = hf_llava.vision_features(
            self.model, pixel_values, self.reducer, self.projector, dict(self.state)
        )
        images, start = [], 0
        for size, count in zip(sizes, counts, strict=True):
            part = slice(start, start + count)
            crops = None if index is None else index[part]
            images.append(pack(self.model, tokens[part], valid[part], crops, size))
            start += count
        return images


def attach(model: nn.Module, reducer, projector=None) -> Patch:
    reason = unsupported(model)
    if reason is not None:
        raise ValueError(f"attach: this transformers LLaVA-NeXT cannot be patched: {reason}")
    return hf_llava.attach(model, reducer, projector, patch=Patch)


def attach_method(model: nn.Module, method, layers, proportional_attn, kwargs: dict):
    """``reference.attach`` for a transformers LLaVA-NeXT: returns the ``Handle``."""
    return hf_llava.attach_method(
        model, method, layers, proportional_attn, kwargs, attach_fn=attach
    )


__all__ = ["Patch", "attach", "attach_method", "matches", "pack", "unsupported"]
