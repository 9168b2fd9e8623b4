"""The contract of methods that replace a VLM's vision-language projector.

A projector (resampler, abstractor, pooling projector) maps the vision tower's
patch features ``[B, N, C_v]`` to the language model's visual tokens
``[B, M, hidden]``; the token reduction is ``M < N``. On the LLaVA host it takes
the place of the MLP projector (``LlavaHost.apply(projector=...)``); the
language model then sees ``M`` image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn


@dataclass
class ProjectorSignals:
    """What the vision tower exposes to a projector.

    Attributes:
        layers: every vision block's output run so far, ``[B, 1 + N, C_v]`` each
            (CLS first), the selected layer last; for multi-level projectors.
        grid: ``(h, w)`` of the patch grid (``h * w == N``).
        state: per-forward scratch space, shared with the other reducers (e.g. the
            caller's ``state["text"]`` for text-guided projectors).
    """

    layers: tuple[Tensor, ...] = ()
    grid: tuple[int, int] = (0, 0)
    state: dict = field(default_factory=dict)


class Projector(nn.Module):
    """Base of every projector method.

    Subclasses set ``catalog_id`` and ``kind`` (a mechanism term of the taxonomy),
    take ``in_dim`` (vision width) and ``out_dim`` (language-model width) in their
    constructor, and implement ``forward(features [B, N, in_dim], signals) ->
    [B, M, out_dim]`` and ``num_tokens(n) -> M``. ``test_configs["some"]`` are the
    constructor arguments for the tiny test host (``in_dim=32``, ``out_dim=64``,
    16 patches on a 4x4 grid); the output must have fewer tokens than the input.
    ``invalid_configs`` lists constructor arguments the paper cannot express, each
    with the argument its ValueError must name (checked by the contract test).
    ``count_argument`` (or an overridden ``count_setting``) says how to reach a given
    number of tokens, so the benchmark compares projectors at equal budgets.
    """

    catalog_id: str = ""
    kind: str = ""
    basis: str = "official code"
    test_configs: ClassVar[dict[str, dict]] = {"some": {"in_dim": 32, "out_dim": 64}}
    invalid_configs: ClassVar[tuple[tuple[dict, str], ...]] = ()
    count_argument: ClassVar[str | None] = None  # the constructor argument that is ``M``
    takes: ClassVar[str] = "features"  # or "pixels": a vision encoder of its own (FastVLM)
    # True: fuses the prompt into ``state["fused_text"]``, which the LLaVA host feeds to its
    # decoder in place of the prompt's embeddings (LLaVA-Mini; see reference.hosts.llava).
    fuses_text: ClassVar[bool] = False

    @classmethod
    def count_setting(cls, keep: int, n_image: int) -> dict | None:
        """Constructor arguments, besides ``in_dim`` and ``out_dim``, that make this
        projector emit ``keep`` tokens for ``n_image`` patches on a square grid
        (``python -m tools bench --suite projector``); None when no setting does. The
        default sets ``count_argument``; the caller checks ``num_tokens`` and a
        ValueError of the constructor means the count is out of reach."""
        return None if cls.count_argument is None else {cls.count_argument: keep}

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def num_tokens(self, n: int) -> int:
        """Visual tokens out for ``n`` patch tokens in."""
        raise NotImplementedError


__all__ = ["Projector", "ProjectorSignals"]
