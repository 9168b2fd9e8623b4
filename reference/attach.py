"""``reference.attach``: one call to put a method on a model, where its paper puts it.

    import reference
    with reference.attach(model, "tome", r=8):   # a catalog id or a method instance
        logits = model(images)
    # leaving the block (or ``handle.detach()``) restores the model exactly

Models: the reference ViT host (``reference.hosts.vit``), a timm ``VisionTransformer``
(``reference.adapters.timm``), the reference LLaVA host (``reference.hosts.llava``),
transformers' LLaVA-1.5 (``reference.adapters.hf_llava``: vision-stage methods and
projectors), LLaVA-NeXT (``hf_llava_next``: the same, per AnyRes crop) and Qwen2-VL /
Qwen2.5-VL (``hf_qwen2_5_vl``: vision-stage methods that need only the tokens); on all
three, language-model methods run inside the decoder (``hf_llava_llm``: Llama, Mistral
and Qwen2 with its 3-D mRoPE).
Placement: ``layers=[...]`` names the blocks (decoder layers for a language-model
method); without it the method's paper setting decides (``paper_setting`` of a
ViT method, ``paper_placement`` of a language-model method), and a method without
one is refused with the reason. Keyword arguments go to the method's constructor
and override the paper setting's.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

from torch import nn

from reference import registry
from reference.adapters import Handle, check_layers, resolve_method
from reference.core import TokenReducer
from reference.hosts.llava import LlavaHost, LLMReducer, SequenceMethod
from reference.hosts.vit import VisionTransformer, split_hooks
from reference.projector import Projector


def attach(
    model: nn.Module,
    method: str | nn.Module | dict[int, nn.Module],
    /,
    *,
    layers: Iterable[int] | None = None,
    proportional_attn: bool | None = None,
    **kwargs,
) -> Handle:
    """Attach ``method`` (a catalog id, or a method instance) to ``model``.

    Args:
        model: a reference host or a timm ``VisionTransformer``.
        method: a catalog id (``"tome"``), an instance (it needs ``layers``), or a dict
            of instances by block (decoder layer).
        layers: blocks (decoder layers) to act at; None: the paper's placement.
        proportional_attn: ToMe's size bias in attention (ViT models); None: the
            paper setting's choice (off for an instance).
        **kwargs: constructor arguments of the method (with a catalog id only).

    Raises:
        ValueError: the model or the method's placement is not supported, with why.
    """
    from reference.adapters import timm as timm_adapter

    for adapter in _model_adapters():
        if adapter.matches(model):
            return adapter.attach_method(model, method, layers, proportional_attn, kwargs)
    if isinstance(model, VisionTransformer) or timm_adapter.is_timm_vit(model):
        reducers, proportional = _vit_reducers(model, method, layers, proportional_attn, kwargs)
        if isinstance(model, VisionTransformer):
            return _attach_own_vit(model, reducers, proportional)
        patch = timm_adapter.attach(model, reducers, proportional)
        return Handle(model, reducers, patch.undo, lambda: patch.last_state)
    if isinstance(model, LlavaHost):
        if isinstance(method, dict):
            if kwargs or layers is not None:
                raise ValueError("attach: a dict of instances takes no layers or keyword arguments")
            method, layers = _one_instance(method)
        if proportional_attn:
            raise ValueError("attach: proportional_attn applies to ViT models only")
        return _attach_llava(model, method, layers, kwargs)
    raise ValueError(
        f"attach: {type(model).__name__} is not supported; supported: reference.hosts.vit."
        "VisionTransformer, timm VisionTransformer, reference.hosts.llava.LlavaHost, "
        "transformers LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
        "Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration"
    )


def _one_instance(methods: dict) -> tuple[nn.Module, list[int]]:
    """A dict of one LLM method instance by decoder layer, for the LLaVA host."""
    instances = {id(m): m for m in methods.values()}
    if len(instances) != 1:
        raise ValueError("attach: on the LLaVA host, a dict must map layers to one instance")
    return next(iter(instances.values())), list(methods)


def _model_adapters() -> list:
    """The adapter modules of ``reference.adapters`` that take whole models: each has
    ``matches(model)`` and ``attach_method(model, method, layers, proportional_attn,
    kwargs) -> Handle`` (the timm adapter is dispatched above, with the ViT hosts)."""
    import reference.adapters as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"reference.adapters.{info.name}")
        if hasattr(module, "matches") and hasattr(module, "attach_method"):
            found.append(module)
    return found


def _vit_reducers(model, method, layers, proportional_attn, kwargs):
    depth, dim = len(model.blocks), model.embed_dim
    if isinstance(method, dict):
        if kwargs or layers is not None:
            raise ValueError("attach: a dict of instances takes no layers or keyword arguments")
        chosen = check_layers(method, depth, "block")
        for m in method.values():  # a method, or a (pre, mid) pair of methods
            try:
                split_hooks(m)
            except (ValueError, TypeError, AttributeError) as exc:
                raise ValueError(f"attach: every value must be ViT token methods: {exc}") from exc
        return {i: method[i] for i in chosen}, bool(proportional_attn)
    if isinstance(method, nn.Module):
        if kwargs:
            raise ValueError("attach: keyword arguments go with a catalog id, not an instance")
        if not isinstance(method, TokenReducer):
            raise ValueError(f"attach: {type(method).__name__} does not act on ViT tokens")
        if layers is None:
            raise ValueError("attach: say where a method instance acts: layers=[...]")
        chosen = check_layers(layers, depth, "block")
        return {i: method for i in chosen}, bool(proportional_attn)
    cls = registry.get(method)
    if not issubclass(cls, TokenReducer):
        raise ValueError(
            f"attach: {method!r} acts in a language model or projector; a ViT has neither"
        )
    setting, proportional = cls.paper_setting(depth, dim)
    if layers is None:
        if not setting:
            raise ValueError(f"attach: {method!r} has no paper placement; pass layers=[...]")
        reducers = {i: cls(**{**kw, **kwargs}) for i, kw in setting.items()}
    else:
        chosen = check_layers(layers, depth, "block")
        reducers = {i: cls(**{**setting.get(i, {}), **kwargs}) for i in chosen}
    if proportional_attn is not None:
        proportional = proportional_attn
    return {i: r.eval() if not model.training else r for i, r in reducers.items()}, proportional


def _attach_own_vit(model: VisionTransformer, reducers: dict, proportional: bool) -> Handle:
    before = {i: block.reducer for i, block in enumerate(model.blocks)}
    was_proportional = model.proportional_attn
    if any(r is not None for r in before.values()):
        raise ValueError("attach: this host already has methods attached; detach them first")
    param = next(model.parameters())
    for pair in reducers.values():
        for reducer in split_hooks(pair):
            if reducer is not None:
                reducer.to(device=param.device)
    for i, reducer in reducers.items():
        model.blocks[i].reducer = reducer if isinstance(reducer, TokenReducer) else tuple(reducer)
    model.proportional_attn = proportional

    def undo() -> None:
        for i, block in enumerate(model.blocks):
            block.reducer = before[i]
        model.proportional_attn = was_proportional

    return Handle(model, reducers, undo, lambda: model.last_state)


def _attach_llava(host: LlavaHost, method, layers, kwargs) -> Handle:
    before = (
        host.vision_reducer,
        dict(host.llm_by_layer),
        host.renumber,
        host.projector,
        host.sequence,
    )
    if before[0] is not None or before[1] or before[3] is not None or before[4] is not None:
        raise ValueError("attach: this host already has methods attached; detach them first")
    cfg = host.cfg
    cls, instance = resolve_method(method, kwargs)
    if issubclass(cls, LLMReducer):
        if instance is not None:
            if layers is None:
                raise ValueError("attach: say where a method instance acts: layers=[...]")
            llm = {i: instance for i in check_layers(layers, cfg.layers, "decoder layer")}
        elif layers is not None:
            llm = {i: cls(**kwargs) for i in check_layers(layers, cfg.layers, "decoder layer")}
        else:
            llm = cls.paper_placement(cfg.layers, **kwargs)
            if not llm:
                raise ValueError(f"attach: {method!r} has no paper placement; pass layers=[...]")
        host.apply(llm=llm)
        reducers: dict = dict(llm)
    elif issubclass(cls, SequenceMethod):  # its own layers: from its constructor arguments
        if layers is not None:
            raise ValueError(f"attach: {cls.catalog_id!r} sets its own layers; pass its arguments")
        sequence = instance if instance is not None else cls.for_host(cfg, **kwargs)
        host.apply(sequence=sequence)
        reducers = {"sequence": sequence}
    elif layers is not None:
        raise ValueError(f"attach: {cls.catalog_id!r} acts at the vision hook; layers do not apply")
    elif issubclass(cls, Projector):
        dims = {"in_dim": cfg.vision["embed_dim"], "out_dim": cfg.hidden}
        projector = instance if instance is not None else cls(**{**dims, **kwargs})
        host.apply(projector=projector)
        reducers = {"projector": projector}
    elif issubclass(cls, TokenReducer):
        vision = instance if instance is not None else cls(**kwargs)
        host.apply(vision=vision)
        reducers = {"vision": vision}
    else:
        raise ValueError(f"attach: {cls.__name__} is not a method of the reference contract")
    param = next(host.parameters())
    for reducer in reducers.values():
        reducer.to(device=param.device, dtype=param.dtype).train(host.training)

    def undo() -> None:
        vision, llm, renumber, projector, sequence = before
        host.apply(
            vision=vision, llm=llm, renumber=renumber, projector=projector, sequence=sequence
        )

    return Handle(host, reducers, undo)


__all__ = ["Handle", "attach"]
