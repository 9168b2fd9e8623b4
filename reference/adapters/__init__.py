"""Adapters that run the reference methods inside other libraries' models (timm, ...).

Each adapter patches a model reversibly and hands back a ``Handle`` whose ``detach``
restores the model exactly. ``reference.attach`` dispatches to the adapter modules
here: ``timm`` (with the project's ViT host), and every module that defines
``matches(model)`` and ``attach_method(model, method, layers, proportional_attn,
kwargs) -> Handle`` (``hf_llava``, ``hf_llava_next``, ``hf_qwen2_5_vl``; language-model
methods of all three run in ``hf_llava_llm``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from reference.hosts.vit import HostState


class Handle:
    """An attached method; a context manager. ``detach`` restores the model (idempotent).

    Attributes:
        model: the patched model.
        reducers: the attached method instances, by block (or decoder layer); for a
            vision-stage or projector method on the LLaVA host, keyed ``"vision"`` or
            ``"projector"``.
    """

    def __init__(self, model: nn.Module, reducers: dict, undo: Callable[[], None], state=None):
        self.model, self.reducers = model, reducers
        self._undo, self._state = undo, state

    @property
    def last_state(self) -> HostState | None:
        """The host state of the model's last forward (ViT models)."""
        return self._state() if self._state is not None else None

    def tokens_after(self) -> list[int]:
        """Token count after each reduction of the last forward (ViT models)."""
        state = self.last_state
        if state is None:
            raise RuntimeError("run a forward first")
        return [r.num_tokens for r in state.reductions]

    def detach(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


_MISSING = object()


class Overrides:
    """Instance attributes set over an object's own (a patched ``forward``), put back exactly.

    ``set`` remembers what the instance held (usually nothing: the class's method shows
    through); ``undo`` restores it, newest first, so the object's ``__dict__`` is as before.
    """

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object]] = []

    def set(self, owner: object, name: str, value: object) -> None:
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        object.__setattr__(owner, name, value)

    def undo(self) -> None:
        for owner, name, previous in reversed(self._saved):
            if previous is _MISSING:
                del owner.__dict__[name]
            else:
                object.__setattr__(owner, name, previous)
        self._saved.clear()


def resolve_method(method: str | nn.Module, kwargs: dict) -> tuple[type, nn.Module | None]:
    """``(class, instance)`` of ``method``, a catalog id (instance None) or an instance
    (which takes no keyword arguments: they go to a catalog id's constructor)."""
    from reference import registry

    if isinstance(method, nn.Module):
        if kwargs:
            raise ValueError("attach: keyword arguments go with a catalog id, not an instance")
        return type(method), method
    return registry.get(method), None


def refuse_sequence_method(cls: type, family: str) -> None:
    """A ValueError, with the reason, for a method that rewrites the language model's
    sequence (``reference.hosts.llava.SequenceMethod``) on a transformers ``family``."""
    from reference.hosts.llava import SequenceMethod

    if issubclass(cls, SequenceMethod):
        raise ValueError(
            f"attach: {cls.catalog_id!r} changes the language model's sequence (learned "
            "tokens, attention mask, routed layers) and needs weights trained with them; "
            f"only reference.hosts.llava.LlavaHost has that hook, not a transformers {family}"
        )


def check_layers(layers: Iterable[int], count: int, what: str) -> list[int]:
    """``layers`` as a list, each an index in ``[0, count)``; a ValueError says which not."""
    layers = list(layers)
    bad = [i for i in layers if not 0 <= i < count]
    if bad or not layers:
        raise ValueError(f"attach: layers must be {what} indices in [0, {count}), got {layers}")
    return layers


__all__ = ["Handle", "Overrides", "check_layers", "refuse_sequence_method", "resolve_method"]
