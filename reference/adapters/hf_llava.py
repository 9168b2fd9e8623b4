"""Vision-stage token reduction inside a transformers ``LlavaForConditionalGeneration``.

``attach`` patches the model's ``forward`` and ``generate`` (instance attributes;
nothing is added to the model, and ``detach`` removes them). When a call brings
``pixel_values``, the adapter runs the CLIP vision tower itself up to the
feature layer (``vision_feature_layer``), computes that layer's attention signals
as the reference LLaVA host does (CLS attention row, keys, full maps or logits,
and the next layer's q/k projections when a method asks), applies the method to
the layer's output (CLS as protected prefix), drops CLS as the
``vision_feature_select_strategy`` says, and projects. Each sample's run of image
placeholder tokens in ``input_ids`` is then shrunk to its own number of kept
tokens, and the batch is re-padded on the side it was padded (left, as
``generate`` wants, unless the input was right-padded); the merged embeddings go
to the model as ``inputs_embeds`` with the new ``attention_mask`` (and, in
``forward``, ``position_ids`` counted over the kept tokens: a reduced sequence is
a shorter prompt, as in the official vision-stage methods). ``generate`` returns
the shrunk prompt's ids followed by the new tokens.

The feature layer runs as CLIP's own layer when the method needs none of its
attention signals (so a zero budget gives the plain model's logits exactly), and
through the adapter's attention (``reference.hosts.vit.attend``) when it does.

Limits (refused with the reason): one image per sample, an integer
``vision_feature_layer``, a CLIP vision tower. Language-model methods
(``LLMReducer``) run inside the decoder: ``reference.adapters.hf_llava_llm``.
LLaVA-NeXT (``hf_llava_next``) reuses ``vision_features``, ``shrink_prompt``,
``Patch`` and ``attach_method`` from here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from reference.adapters import Overrides
from reference.core import Signals, TokenReducer
from reference.hosts.vit import attend
from reference.projector import Projector, ProjectorSignals


def matches(model: nn.Module) -> bool:
    try:
        from transformers import LlavaForConditionalGeneration
    except ImportError:  # transformers not installed: no model can be one
        return False
    return isinstance(model, LlavaForConditionalGeneration)


def unsupported(model: nn.Module) -> str | None:
    from transformers import CLIPVisionModel

    config = model.config
    if not isinstance(model.model.vision_tower, CLIPVisionModel):
        return f"the vision tower is a {type(model.model.vision_tower).__name__}, not CLIP's"
    if not isinstance(config.vision_feature_layer, int):
        return "a list of vision feature layers is not supported"
    return None


# Signals only the adapter's own attention at the feature layer gives (CLIP's layer does not).
ATTENTION_SIGNALS = frozenset({"cls_attn", "keys", "attn", "attn_logits", "values"})


def vision_features(
    model: nn.Module,
    pixel_values: Tensor,
    reducer: TokenReducer | None,
    projector: Projector | None,
    state: dict,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The image tokens of ``pixel_values [B, 3, H, W]`` (B images, or crops) after the method.

    Returns:
        ``[B, K, hidden]`` projected tokens, ``[B, K]`` False for empty slots, and
        ``[B, K]`` the patch (row-major, CLS not counted) each token continues, -1 for
        CLS or a token the method made; None after a projector method.
    """
    config, vm = model.config, model.model.vision_tower
    layers = vm.encoder.layers
    feature = config.vision_feature_layer % (len(layers) + 1)  # index into hidden_states
    if feature == 0:
        raise ValueError("attach: vision_feature_layer 0 is the embeddings; no layer to hook")
    h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype)))
    outputs = [h]
    for layer in layers[: feature - 1]:
        h = layer(h, None)
        outputs.append(h)
    needs = reducer.needs if reducer is not None else frozenset()
    layer = layers[feature - 1]
    b, n, _ = h.shape
    if needs & ATTENTION_SIGNALS:
        x = layer.layer_norm1(h)
        a = layer.self_attn

        def heads(t: Tensor) -> Tensor:
            return t.view(b, n, -1, a.head_dim).transpose(1, 2)

        out, signals = attend(
            heads(a.q_proj(x)), heads(a.k_proj(x)), heads(a.v_proj(x)), a.scale, None, needs
        )
        h = h + a.out_proj(out.transpose(1, 2).reshape(b, n, -1))
        h = h + layer.mlp(layer.layer_norm2(h))
    else:  # CLIP's own layer: the plain model's numbers
        h, signals = layer(h, None), {}
    outputs.append(h)
    if needs & {"next_q", "next_k"} and feature < len(layers):
        nxt = layers[feature]
        y = nxt.layer_norm1(h)
        signals["next_q"], signals["next_k"] = nxt.self_attn.q_proj(y), nxt.self_attn.k_proj(y)
    valid = torch.ones(b, n, dtype=torch.bool, device=h.device)
    index = torch.arange(n, device=h.device).expand(b, n)
    if reducer is not None:
        size = h.new_ones(b, n, 1)
        mlp = model.model.multi_modal_projector if projector is None else None
        red = reducer(
            h,
            Signals(prefix=1, size=size, layer=feature - 1, state=state, projector=mlp, **signals),
        )
        h, index = red.x, red.index
        valid = torch.ones(red.x.shape[:2], dtype=torch.bool, device=h.device)
        if red.mask is not None and reducer.masks_attention:
            valid = red.mask > 0
    index = torch.where(index >= 1, index - 1, -1)  # patches from 0; CLS and made tokens -1
    if config.vision_feature_select_strategy == "default":
        h, valid, index = h[:, 1:], valid[:, 1:], index[:, 1:]
    if projector is not None:
        side = int((n - 1) ** 0.5)
        tokens = projector(h, ProjectorSignals(tuple(outputs), (side, side), state))
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=h.device), None
    return model.model.multi_modal_projector(h), valid, index


def shrink_prompt(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    images: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """``input_ids``, ``attention_mask`` and ``inputs_embeds`` with each sample's image
    run cut to its own image tokens ``images[i] [K_i, hidden]``, re-padded on the
    input's padding side (left unless the input was right-padded)."""
    image_id = model.config.image_token_id
    pad_id = model.config.text_config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    right = bool((mask[:, -1] == 0).any())
    if len(images) != input_ids.shape[0]:
        raise ValueError(f"attach: {len(images)} images for {input_ids.shape[0]} samples")
    rows, masks, spans = [], [], []
    for i in range(input_ids.shape[0]):
        run = (input_ids[i] == image_id).nonzero()[:, 0]
        if run.numel() == 0 or run[-1] - run[0] + 1 != run.numel():
            raise ValueError("attach: each sample needs exactly one run of image tokens")
        k = images[i].shape[0]
        start, end = int(run[0]), int(run[-1]) + 1
        ids = torch.cat(
            [input_ids[i, :start], input_ids.new_full((k,), image_id), input_ids[i, end:]]
        )
        m = torch.cat([mask[i, :start], mask.new_ones(k), mask[i, end:]])
        rows.append(ids)
        masks.append(m)
        spans.append(start)
    width = max(r.shape[0] for r in rows)
    out_ids = input_ids.new_full((len(rows), width), pad_id)
    out_mask = mask.new_zeros(len(rows), width)
    embeds = model.get_input_embeddings()
    out_emb = None
    for i, (ids, m) in enumerate(zip(rows, masks, strict=True)):
        offset = 0 if right else width - ids.shape[0]
        out_ids[i, offset : offset + ids.shape[0]] = ids
        out_mask[i, offset : offset + ids.shape[0]] = m
        emb = embeds(ids)
        emb[spans[i] : spans[i] + images[i].shape[0]] = images[i].to(emb.dtype)
        if out_emb is None:
            out_emb = emb.new_zeros(len(rows), width, emb.shape[-1])
        out_emb[i, offset : offset + ids.shape[0]] = emb
    return out_ids, out_mask, out_emb


class Patch:
    """The patched state of one model; ``undo`` restores it. A model family with its
    own image layout (LLaVA-NeXT) overrides ``image_tokens``."""

    def __init__(self, model: nn.Module, reducer: TokenReducer | None, projector: Projector | None):
        self.model, self.reducer, self.projector = model, reducer, projector
        self.state: dict = {}
        self.last_attention_mask: Tensor | None = None  # of the last shrunk prompt
        self.last_input_ids: Tensor | None = None
        self._overrides = Overrides()
        original_forward, original_generate = model.forward, model.generate
        self._set("forward", self._wrap(original_forward, generating=False))
        self._set("generate", self._wrap(original_generate, generating=True))

    def _set(self, name: str, value: object) -> None:
        self._overrides.set(self.model, name, value)

    def undo(self) -> None:
        self._overrides.undo()

    def image_tokens(self, pixel_values: Tensor, kwargs: dict) -> list[Tensor]:
        """Each sample's image tokens ``[K_i, hidden]`` (pops what it reads from ``kwargs``)."""
        tokens, valid, _ = vision_features(
            self.model, pixel_values, self.reducer, self.projector, dict(self.state)
        )
        return [t[v] for t, v in zip(tokens, valid, strict=True)]

    def _wrap(self, original: Callable, generating: bool) -> Callable:
        def call(input_ids: Tensor | None = None, *args, **kwargs):
            pixel_values = kwargs.pop("pixel_values", None)
            if pixel_values is None or input_ids is None or kwargs.get("inputs_embeds") is not None:
                if pixel_values is not None:
                    kwargs["pixel_values"] = pixel_values
                return original(input_ids, *args, **kwargs)
            if args:
                raise ValueError("attach: pass the model's inputs by keyword")
            with torch.no_grad() if generating else contextlib.nullcontext():
                images = self.image_tokens(pixel_values, kwargs)
            ids, mask, embeds = shrink_prompt(
                self.model, input_ids, kwargs.pop("attention_mask", None), images
            )
            self.last_attention_mask, self.last_input_ids = mask, ids
            if generating:
                return original(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **kwargs)
            kwargs.pop("position_ids", None)  # they counted the image tokens before the cut
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            return original(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs
            )

        return call


def attach(
    model: nn.Module, reducer, projector: Projector | None = None, patch: type[Patch] = Patch
) -> Patch:
    reason = unsupported(model)
    if "generate" in model.__dict__ or "forward" in model.model.__dict__:  # either stage
        reason = "it already has methods attached; detach them first"
    if reason is not None:
        raise ValueError(f"attach: this transformers LLaVA cannot be patched: {reason}")
    param = next(model.parameters())
    for part in (reducer, projector):
        if part is not None:
            part.to(device=param.device, dtype=param.dtype).eval()
    return patch(model, reducer, projector)


def to_reference_host(model: nn.Module):
    """A ``reference.hosts.llava.LlavaHost`` with this LLaVA's weights (CLIP tower included).

    The host's ViT takes CLIP's pre-norm, QuickGELU and LayerNorm eps; CLIP's separate
    q/k/v projections are concatenated into the host's ``qkv``; the patch embedding
    has no bias in CLIP (the host's is set to zero). Only what LLaVA uses is copied
    (the post-layernorm is not).
    """
    from reference.hosts.llava import LlavaConfig, LlavaHost

    vc, tc = model.config.vision_config, model.config.text_config
    if not isinstance(model.config.vision_feature_layer, int):
        raise ValueError("to_reference_host: a list of vision feature layers is not supported")
    if model.config.vision_feature_select_strategy != "default":
        raise ValueError("to_reference_host: the host drops CLS (strategy 'default') only")
    depth = vc.num_hidden_layers
    rope = getattr(tc, "rope_parameters", None) or {}
    cfg = LlavaConfig(
        vision=dict(
            img_size=vc.image_size,
            patch_size=vc.patch_size,
            embed_dim=vc.hidden_size,
            depth=depth,
            num_heads=vc.num_attention_heads,
            mlp_ratio=vc.intermediate_size / vc.hidden_size,
            num_classes=0,
            pre_norm=True,
            act="quick_gelu" if vc.hidden_act == "quick_gelu" else "gelu",
            norm_eps=vc.layer_norm_eps,
        ),
        vision_layer=model.config.vision_feature_layer % (depth + 1) - 1,
        hidden=tc.hidden_size,
        layers=tc.num_hidden_layers,
        heads=tc.num_attention_heads,
        kv_heads=tc.num_key_value_heads,
        intermediate=tc.intermediate_size,
        vocab=tc.vocab_size,
        rope_theta=rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0)),
        eps=tc.rms_norm_eps,
    )
    host = LlavaHost(cfg)
    src = model.state_dict()
    dst: dict[str, Tensor] = {}
    v = "model.vision_tower."
    dst["vision_tower.cls_token"] = src[v + "embeddings.class_embedding"].view(1, 1, -1)
    dst["vision_tower.pos_embed"] = src[v + "embeddings.position_embedding.weight"][None]
    dst["vision_tower.patch_embed.proj.weight"] = src[v + "embeddings.patch_embedding.weight"]
    dst["vision_tower.patch_embed.proj.bias"] = torch.zeros(vc.hidden_size)
    for part in ("weight", "bias"):
        dst[f"vision_tower.norm_pre.{part}"] = src[v + f"pre_layrnorm.{part}"]
        dst[f"vision_tower.norm.{part}"] = src[v + f"post_layernorm.{part}"]
    for i in range(depth):
        s, d = f"{v}encoder.layers.{i}.", f"vision_tower.blocks.{i}."
        for part in ("weight", "bias"):
            qkv = [src[f"{s}self_attn.{p}_proj.{part}"] for p in "qkv"]
            dst[f"{d}attn.qkv.{part}"] = torch.cat(qkv, 0)
            dst[f"{d}attn.proj.{part}"] = src[f"{s}self_attn.out_proj.{part}"]
            dst[f"{d}norm1.{part}"] = src[f"{s}layer_norm1.{part}"]
            dst[f"{d}norm2.{part}"] = src[f"{s}layer_norm2.{part}"]
            dst[f"{d}mlp.fc1.{part}"] = src[f"{s}mlp.fc1.{part}"]
            dst[f"{d}mlp.fc2.{part}"] = src[f"{s}mlp.fc2.{part}"]
    for part in ("weight", "bias"):
        dst[f"mm_projector.0.{part}"] = src[f"model.multi_modal_projector.linear_1.{part}"]
        dst[f"mm_projector.2.{part}"] = src[f"model.multi_modal_projector.linear_2.{part}"]
    t = "model.language_model."
    dst["embed_tokens.weight"] = src[t + "embed_tokens.weight"]
    dst["norm.weight"] = src[t + "norm.weight"]
    dst["lm_head.weight"] = src["lm_head.weight"]
    names = ["input_layernorm", "post_attention_layernorm"]
    names += [f"self_attn.{p}_proj" for p in "qkvo"] + [
        f"mlp.{p}_proj" for p in ("gate", "up", "down")
    ]
    for i in range(tc.num_hidden_layers):
        for name in names:
            local = name.split(".")[-1]
            dst[f"layers.{i}.{local}.weight"] = src[f"{t}layers.{i}.{name}.weight"]
    host.load_state_dict(dst)
    return host.to(next(model.parameters()).dtype).eval()


def attach_method(
    model: nn.Module, method, layers, proportional_attn, kwargs: dict, *, attach_fn=None
):
    """``reference.attach`` for a transformers LLaVA: returns the ``Handle``.

    ``attach_fn(model, reducer, projector) -> Patch`` patches the vision stage (this
    module's ``attach`` unless a model family brings its own: LLaVA-NeXT)."""
    from reference.adapters import Handle, hf_llava_llm, refuse_sequence_method, resolve_method
    from reference.hosts.llava import LLMReducer

    if proportional_attn:
        raise ValueError("attach: on a transformers LLaVA, methods act at the vision hook only")
    if "generate" in model.__dict__:  # a vision-stage patch hides the image from the decoder's
        raise ValueError(
            "attach: this transformers LLaVA cannot be patched: it already has methods "
            "attached; detach them first"
        )
    if isinstance(method, dict):  # instances by decoder layer: LLM-stage methods only
        return hf_llava_llm.attach_method(model, method, None, layers, kwargs)
    cls, instance = resolve_method(method, kwargs)
    refuse_sequence_method(cls, type(model).__name__)
    if issubclass(cls, LLMReducer):  # inside the decoder: reference.adapters.hf_llava_llm
        return hf_llava_llm.attach_method(model, cls, instance, layers, kwargs)
    if layers is not None:
        raise ValueError("attach: on a transformers LLaVA, methods act at the vision hook only")
    text = model.config.text_config
    if issubclass(cls, Projector):
        dims = {"in_dim": model.config.vision_config.hidden_size, "out_dim": text.hidden_size}
        projector = instance if instance is not None else cls(**{**dims, **kwargs})
        patch = (attach_fn or attach)(model, None, projector)
        reducers = {"projector": projector}
    elif issubclass(cls, TokenReducer):
        reducer = instance if instance is not None else cls(**kwargs)
        patch = (attach_fn or attach)(model, reducer, None)
        reducers = {"vision": reducer}
    else:
        raise ValueError(f"attach: {cls.__name__} is not a method of the reference contract")
    handle = Handle(model, reducers, patch.undo)
    handle.patch = patch
    return handle


__all__ = [
    "Patch",
    "attach",
    "attach_method",
    "matches",
    "shrink_prompt",
    "to_reference_host",
    "unsupported",
    "vision_features",
]
