"""Vision-stage token reduction inside a transformers Qwen2.5-VL (and Qwen2-VL).

``attach`` patches the model's ``forward`` and ``generate`` (instance attributes;
nothing is added to the model, and ``detach`` removes them and restores the
language model's cached ``rope_deltas``). When a call brings ``pixel_values``
with ``image_grid_thw``, the adapter runs the model's own vision tower
(``get_image_features``: patch embedding, windowed and full-attention blocks,
patch merger) and applies the method to each image's merged tokens separately,
as ``x [1, M, C]`` with ``prefix = 0`` (Qwen's ViT has no CLS token) and
``state["grid"] = (t, h, w)``, the merged grid (``image_grid_thw`` with ``h`` and
``w`` divided by ``spatial_merge_size``; the tokens are in its row-major order).

Positions: the full prompt's 3-D mRoPE ``position_ids`` come from the model's own
``get_rope_index`` before the cut. Text tokens keep theirs (text after an image
too), a kept image token keeps its own ``(t, h, w)``, and a token the method made
(``Reduction.index == -1``, e.g. a pooled cell) takes the mean of the positions of
the tokens assigned to it, rounded down. Each sample's image placeholder runs are
cut to their kept tokens, the batch is re-padded on the side it was padded, and
the model's original ``forward``/``generate`` gets ``inputs_embeds`` (the kept
visual tokens scattered into the kept placeholder slots), the new
``attention_mask`` and ``position_ids``. ``model.model.rope_deltas`` is set to
``max(position) + 1 - length`` per sample, so a cached forward without
``position_ids`` continues at ``max(position) + 1``; ``generate`` continues from
the last position as the official generation code does (the same for a prompt
that ends in text). ``generate`` returns the shrunk prompt's ids and the new tokens.

Refused, with the reason: signals that do not exist at the merged tokens
(``cls_attn``: no CLS token; ``keys``, ``attn``, ``attn_logits``, ``values``: no
attention layer sees the merged tokens, the vision blocks attend over the
un-merged patches; ``next_q``/``next_k``: no vision block follows the merger),
videos, ``labels`` and projector methods. Language-model methods (``LLMReducer``:
FastV, PyramidDrop, ...) go to the decoder patch shared with LLaVA,
``reference.adapters.hf_llava_llm``, which follows the 3-D mRoPE positions.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from reference.adapters import Overrides
from reference.core import Signals, TokenReducer

# Why each signal a method may declare in ``needs`` cannot be given at this hook.
REFUSED = {
    "cls_attn": "Qwen's vision tower has no CLS token, so there is no CLS attention",
    "keys": "no attention layer sees the merged tokens (the vision blocks attend over "
    "the un-merged patches, four per merged token), so they have no keys",
    "attn": "no attention layer sees the merged tokens, so there is no attention map for them",
    "attn_logits": "no attention layer sees the merged tokens, so there are no logits for them",
    "values": "no attention layer sees the merged tokens, so they have no attention values",
    "next_q": "no vision block follows the patch merger",
    "next_k": "no vision block follows the patch merger",
}


def _classes() -> tuple[type, ...]:
    try:
        from transformers import (
            Qwen2_5_VLForConditionalGeneration,
            Qwen2VLForConditionalGeneration,
        )
    except ImportError:  # transformers not installed: no model can be one
        return ()
    return Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration


def matches(model: nn.Module) -> bool:
    classes = _classes()
    return bool(classes) and isinstance(model, classes)


def refusal(reducer: TokenReducer) -> str | None:
    """Why ``reducer`` cannot run at the merged vision tokens, or None."""
    missing = sorted(reducer.needs)
    if not missing:
        return None
    reasons = "; ".join(f"{need}: {REFUSED.get(need, 'not computed here')}" for need in missing)
    return (
        f"{type(reducer).__name__} needs {', '.join(missing)}, which Qwen-VL cannot give: {reasons}"
    )


def image_positions(p: Tensor, index: Tensor, assign: Tensor) -> Tensor:
    """The ``[3, K]`` mRoPE positions of the ``K`` output tokens of one image.

    Args:
        p: ``[3, M]`` the positions of the image's ``M`` merged tokens before the cut.
        index: ``[K]`` the input token each output token continues, -1 for a made one.
        assign: ``[M]`` the output slot each input token went into, -1 for dropped.
    """
    k, held = index.shape[0], assign >= 0
    sums = p.new_zeros(3, k).index_add_(1, assign[held], p[:, held])
    counts = torch.bincount(assign[held], minlength=k)
    made = index < 0
    if bool((made & (counts == 0)).any()):
        raise ValueError("attach: the method made a token from no image token; it has no position")
    return torch.where(made, sums // counts.clamp(min=1), p[:, index.clamp(min=0)])


def reduce_images(
    model: nn.Module, pixel_values: Tensor, grid_thw: Tensor, reducer: TokenReducer, state: dict
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per image: kept tokens ``[K, C]``, their input index ``[K]`` and assignment ``[M]``."""
    visual = model.model.visual
    features = model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
    merge = visual.spatial_merge_size
    tokens, indices, assigns = [], [], []
    for feat, (t, h, w) in zip(features.pooler_output, grid_thw.tolist(), strict=True):
        x = feat[None]  # [1, M, C]
        grid = (t, h // merge, w // merge)
        signals = Signals(
            prefix=0,
            size=x.new_ones(1, x.shape[1], 1),
            layer=len(visual.blocks) - 1,
            state={**state, "grid": grid},
        )
        red = reducer(x, signals)
        keep = torch.ones(red.x.shape[1], dtype=torch.bool, device=x.device)
        if red.mask is not None and reducer.masks_attention:
            keep = red.mask[0] > 0
        tokens.append(red.x[0][keep])
        indices.append(red.index[0][keep])
        # a slot left out (empty) owns no input token any more
        slot_of = torch.full((red.x.shape[1],), -1, dtype=torch.long, device=x.device)
        slot_of[keep] = torch.arange(int(keep.sum()), device=x.device)
        a = red.assign[0]
        assigns.append(torch.where(a >= 0, slot_of[a.clamp(min=0)], a))
    return tokens, indices, assigns


def shrink_prompt(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    positions: Tensor,
    images: tuple[list[Tensor], list[Tensor], list[Tensor]],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cut each image placeholder run to its kept tokens and re-pad.

    Args:
        input_ids: ``[B, L]``; attention_mask: ``[B, L]`` or None.
        positions: ``[3, B, L]`` mRoPE positions of the full prompt (``get_rope_index``).
        images: ``reduce_images``' output, images in prompt order.

    Returns:
        ``input_ids [B, L']``, ``attention_mask [B, L']``, ``inputs_embeds [B, L', C]``,
        ``position_ids [3, B, L']`` and ``rope_deltas [B, 1]``.
    """
    image_id = model.config.image_token_id
    pad_id = model.config.text_config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    right = bool((mask[:, -1] == 0).any())
    embeds = model.get_input_embeddings()(input_ids)
    tokens, indices, assigns = images
    rows, image = [], 0
    for i in range(input_ids.shape[0]):
        where = (input_ids[i] == image_id).nonzero()[:, 0].tolist()
        ids, msk, emb, pos, cursor = [], [], [], [], 0
        while where:
            if image == len(tokens):
                raise ValueError("attach: more image placeholder tokens than images")
            m = assigns[image].shape[0]
            start = where[0]
            if where[:m] != list(range(start, start + m)):
                raise ValueError(
                    f"attach: image {image} has {m} merged tokens, but the placeholder run "
                    f"at {start} of sample {i} does not hold them in a row"
                )
            ids += [
                input_ids[i, cursor:start],
                input_ids.new_full((tokens[image].shape[0],), image_id),
            ]
            msk += [mask[i, cursor:start], mask.new_ones(tokens[image].shape[0])]
            emb += [embeds[i, cursor:start], tokens[image].to(embeds.dtype)]
            p = image_positions(positions[:, i, start : start + m], indices[image], assigns[image])
            pos += [positions[:, i, cursor:start], p]
            cursor, where, image = start + m, where[m:], image + 1
        ids.append(input_ids[i, cursor:])
        msk.append(mask[i, cursor:])
        emb.append(embeds[i, cursor:])
        pos.append(positions[:, i, cursor:])
        rows.append((torch.cat(ids), torch.cat(msk), torch.cat(emb), torch.cat(pos, 1)))
    if image != len(tokens):
        raise ValueError(f"attach: {len(tokens)} images but {image} placeholder runs")
    b, width = len(rows), max(r[0].shape[0] for r in rows)
    out_ids = input_ids.new_full((b, width), pad_id)
    out_mask = mask.new_zeros(b, width)
    out_emb = embeds.new_zeros(b, width, embeds.shape[-1])
    out_pos = positions.new_zeros(3, b, width)
    deltas = positions.new_zeros(b, 1)
    for i, (ids, msk, emb, pos) in enumerate(rows):
        n = ids.shape[0]
        s = slice(0, n) if right else slice(width - n, width)
        out_ids[i, s], out_mask[i, s], out_emb[i, s], out_pos[:, i, s] = ids, msk, emb, pos
        real = msk > 0
        deltas[i, 0] = pos[:, real].max() + 1 - int(real.sum())  # as get_rope_index's
    return out_ids, out_mask, out_emb, out_pos, deltas


class Patch:
    """The patched state of one model; ``undo`` restores it."""

    def __init__(self, model: nn.Module, reducer: TokenReducer):
        self.model, self.reducer = model, reducer
        self.state: dict = {}
        self.last_attention_mask: Tensor | None = None  # of the last shrunk prompt
        self.last_input_ids: Tensor | None = None
        self.last_position_ids: Tensor | None = None  # [3, B, L'] of the last shrunk prompt
        self._rope_deltas = model.model.rope_deltas
        self._overrides = Overrides()
        original_forward, original_generate = model.forward, model.generate
        self._set("forward", self._wrap(original_forward, generating=False))
        self._set("generate", self._wrap(original_generate, generating=True))

    def _set(self, name: str, value: object) -> None:
        self._overrides.set(self.model, name, value)

    def undo(self) -> None:
        self._overrides.undo()
        self.model.model.rope_deltas = self._rope_deltas

    def _wrap(self, original: Callable, generating: bool) -> Callable:
        model = self.model

        @functools.wraps(original)  # generate reads the forward's signature
        def call(input_ids: Tensor | None = None, *args, **kwargs):
            encoded = kwargs.get("mm_encoder_outputs") or {}  # generate passes {} when decoding
            for name, given in (
                ("pixel_values_videos", kwargs.get("pixel_values_videos")),
                ("mm_encoder_outputs", next((v for v in encoded.values() if v is not None), None)),
            ):
                if given is not None:  # it would reach the language model uncut
                    raise ValueError(f"attach: on Qwen-VL, {name} is not supported with a method")
            pixel_values = kwargs.get("pixel_values")
            if pixel_values is None or input_ids is None or kwargs.get("inputs_embeds") is not None:
                return original(input_ids, *args, **kwargs)
            if args:
                raise ValueError("attach: pass the model's inputs by keyword")
            if kwargs.get("labels") is not None:
                raise ValueError(
                    "attach: on Qwen-VL, labels would need the same cut; not supported"
                )
            grid = kwargs.pop("image_grid_thw", None)
            if grid is None:
                raise ValueError("attach: Qwen-VL needs image_grid_thw with pixel_values")
            kwargs.pop("pixel_values")
            kwargs.pop("position_ids", None)  # they counted the image tokens before the cut
            kwargs.pop("second_per_grid_ts", None)  # videos only
            types = kwargs.pop("mm_token_type_ids", None)
            if types is None:
                types = (input_ids == model.config.image_token_id).int()
            mask = kwargs.pop("attention_mask", None)
            with torch.no_grad() if generating else contextlib.nullcontext():
                images = reduce_images(model, pixel_values, grid, self.reducer, dict(self.state))
            positions, _ = model.model.get_rope_index(
                input_ids, types, image_grid_thw=grid, attention_mask=mask
            )
            ids, mask, embeds, positions, deltas = shrink_prompt(
                model, input_ids, mask, positions, images
            )
            self.last_attention_mask, self.last_input_ids = mask, ids
            self.last_position_ids = positions
            if generating:
                # [4, B, L']: the text positions first, as Qwen's generation code builds them
                text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
                out = original(
                    input_ids=ids,
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    position_ids=torch.cat([text[None], positions]),
                    **kwargs,
                )
            else:
                out = original(
                    inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs
                )
            model.model.rope_deltas = deltas
            return out

        return call


def attach(model: nn.Module, reducer: TokenReducer) -> Patch:
    reason = refusal(reducer)
    if "generate" in model.__dict__ or "forward" in model.model.__dict__:
        reason = "it already has methods attached; detach them first"
    if reason is not None:
        raise ValueError(f"attach: this transformers Qwen-VL cannot be patched: {reason}")
    param = next(model.parameters())
    reducer.to(device=param.device, dtype=param.dtype).eval()
    return Patch(model, reducer)


def attach_method(model: nn.Module, method, layers, proportional_attn, kwargs: dict):
    """``reference.attach`` for a transformers Qwen2.5-VL or Qwen2-VL: returns the ``Handle``."""
    from reference.adapters import Handle, hf_llava_llm, refuse_sequence_method, resolve_method
    from reference.hosts.llava import LLMReducer

    if proportional_attn:
        raise ValueError("attach: proportional_attn applies to ViT models only")
    if isinstance(method, dict):  # LLM-stage instances by decoder layer
        return hf_llava_llm.attach_method(model, method, None, layers, kwargs)
    cls, instance = resolve_method(method, kwargs)
    refuse_sequence_method(cls, type(model).__name__)
    if issubclass(cls, LLMReducer):  # inside the decoder: reference.adapters.hf_llava_llm
        return hf_llava_llm.attach_method(model, cls, instance, layers, kwargs)
    if layers is not None:
        raise ValueError(
            "attach: on a transformers Qwen-VL, vision-stage methods act at the vision hook only"
        )
    if not issubclass(cls, TokenReducer):
        raise ValueError(
            f"attach: {cls.__name__} acts in the projector; on a transformers Qwen-VL "
            "only vision-stage token reducers and language-model methods are supported"
        )
    reducer = instance if instance is not None else cls(**kwargs)
    patch = attach(model, reducer)
    handle = Handle(model, {"vision": reducer}, patch.undo)
    handle.patch = patch
    return handle


__all__ = ["REFUSED", "Patch", "attach", "attach_method", "matches", "refusal", "shrink_prompt"]
