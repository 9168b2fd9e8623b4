"""PyramidDrop: drop image tokens stage by stage inside the language model.

Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", https://arxiv.org/abs/2410.17247
Official code: https://github.com/Cooperx521/PyramidDrop (``pdrop_forward`` and
``pdrop_rank_drop`` in ``llava/model/modeling_llama_pdrop.py``)

Algorithm (Sec. 3.2):
1. Split the decoder into ``S`` stages at layers ``L_1 < L_2 < ...``.
2. At the end of stage ``s``, score each remaining image token by the attention
   the last instruction token pays it in layer ``L_s`` (that layer's input norm,
   q/k projections and RoPE applied to the hidden states entering it, averaged
   over heads), and keep the top ``floor(N * lambda^s)`` of the ``N`` image
   tokens that entered the LLM, in sequence order.
3. Text tokens are always kept; positions are renumbered ``0..n-1``; the image
   sequence narrows like a pyramid.

Deviations from the official code:
- One registered class, one instance per stage boundary: ``PyramidDrop.schedule``
  builds ``{layer: PyramidDrop(retain=lambda^s)}`` for ``host.apply(llm=...)``.
  ``retain`` is a fraction of the image tokens that entered the LLM (the official
  ``image_token_ratio_list``), so each instance reads that count from
  ``signals.state["pyramiddrop.n_image"]``, written by the first stage to run; the
  count is ``floor(N * retain)`` as in the official code.
- The hook runs after layer ``L_s - 1`` and reads the host's ``next_attn``
  signal: the row layer ``L_s`` would compute, as the official code scores it.
  A hook after the last decoder layer has no next layer and raises.
- ``renumber=True`` (the default, as in the official code) has the host
  renumber positions after each drop, and each later layer decodes at its own
  sequence's length; ``renumber=False`` keeps the host's convention (kept tokens
  keep their positions).
- With grouped-query attention the keys are repeated per query head; the
  official ``matmul`` supports only as many key/value heads as query heads.
- Training mode (queries = every token right before an answer span, averaged)
  is left out: the query is always each sample's last valid token, the
  official inference setting. Nothing is learned, so there is no training path.
- Batched with right padding: each sample uses its own last valid token.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction
from reference.hosts.llava import LLMReducer, LLMSignals
from reference.ops import keep_image_tokens
from reference.registry import register

STATE_KEY = "pyramiddrop.n_image"


def rank_and_drop(h: Tensor, last_attn: Tensor, start: int, length: int, keep: int) -> Reduction:
    """Keep the ``keep`` image tokens the query attends to most (Eq. 2-3).

    Args:
        h: ``[B, N, C]`` hidden states after the stage's last layer.
        last_attn: ``[B, H, N]`` attention of each sample's last instruction token
            (in the next layer: the host's ``next_attn``).
        start, length: the image span ``[start, start + length)``.
        keep: image tokens left after the drop.
    """
    with torch.no_grad():
        scores = last_attn.mean(1)[:, start : start + length]  # [B, Nv]
        idx = scores.topk(keep, dim=1).indices  # [B, keep]
    return keep_image_tokens(h, None, start, length, idx)


@register
class PyramidDrop(LLMReducer):
    """One stage boundary: keep ``retain`` of the image tokens that entered the LLM."""

    catalog_id = "pyramiddrop"
    kind = "pruning"
    needs = frozenset({"next_attn"})
    test_configs: ClassVar[dict[str, dict]] = {"zero": {"retain": 1.0}, "some": {"retain": 0.5}}

    def __init__(self, retain: float = 0.5, renumber: bool = True):
        super().__init__()
        if not 0 <= retain <= 1:
            raise ValueError(f"retain must be in [0, 1], got {retain}")
        self.retain = retain
        self.renumber = renumber

    @classmethod
    def schedule(cls, layers: list[int], lam: float = 0.5) -> dict[int, PyramidDrop]:
        """The paper's pyramid: after decoder layer ``layers[s] - 1`` keep ``lam^(s+1)``.

        ``layers`` are the official ``layer_list`` (e.g. ``[8, 16, 24]`` for a
        32-layer LLaVA-1.5-7B with ``lam = 0.5``): the first layer of each new stage.
        """
        return {layer - 1: cls(lam ** (s + 1)) for s, layer in enumerate(sorted(layers))}

    @classmethod
    def paper_placement(cls, num_layers: int, lam: float = 0.5, **kwargs) -> dict[int, PyramidDrop]:
        """The official LLaVA-1.5 pyramid ``layer_list = [8, 16, 24]`` of 32 layers, scaled
        to ``num_layers`` (stage boundaries at a quarter, half and three quarters)."""
        if kwargs:
            raise ValueError(f"PyramidDrop's placement takes lam only, got {sorted(kwargs)}")
        bounds = sorted({max(1, round(num_layers * q)) for q in (0.25, 0.5, 0.75)})
        return cls.schedule([b for b in bounds if b < num_layers], lam)

    def kept(self, n_image: int) -> int:
        # The official code truncates: ``int(N * ratio)``; a tolerance guards 0.3 * 10 = 2.999...
        return min(n_image, math.floor(n_image * self.retain + 1e-9))

    def image_budget(self, n_image: int) -> tuple[int, int]:
        """``n_image``: the image tokens that entered the language model."""
        return self.kept(n_image), self.kept(n_image)

    def forward(self, h: Tensor, signals: LLMSignals) -> Reduction:
        start, length = signals.image_start, signals.image_len
        n_image = signals.state.setdefault(STATE_KEY, length)
        keep = min(length, self.kept(n_image))  # never more than are left
        if signals.next_attn is None:
            raise ValueError("PyramidDrop scores with the next decoder layer; none follows")
        return rank_and_drop(h, signals.next_attn, start, length, keep)
