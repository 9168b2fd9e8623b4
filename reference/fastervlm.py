"""FasterVLM: keep the image tokens that the vision tower's [CLS] attends to most.

Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning:
Make VLM Inference Faster", https://arxiv.org/abs/2412.01818v1
Official code: https://github.com/Theia-4869/FasterVLM
(``llava/model/multimodal_encoder/clip_encoder.py``: ``feature_select``;
``llava/model/llava_arch.py``: ``encode_images``)

Algorithm:
1. Run the vision tower up to the layer whose output LLaVA feeds the projector
   (the penultimate one) and take that layer's attention of the [CLS] query to
   every patch token, averaged over heads.
2. Keep the ``T`` patch tokens with the highest [CLS] attention, in their
   original order (prune the other ``R%``); the projector and the language model
   only see those.

Deviations from the official code:
- Mapping onto the host: a vision-stage ``TokenReducer`` at the LLaVA host's
  selected vision layer (``LlavaHost.apply(vision=...)``), where the host gives
  the [CLS] attention row of that layer (the official code reads the same row
  from ``output_attentions`` of ``hidden_states[select_layer]``'s layer). The
  official code projects all tokens and then masks; projecting only the kept
  ones is the same because the projector acts per token.
- All ``prefix`` tokens are protected and excluded from the ranking (the
  official code only has the CLS token; LLaVA drops it after the projector's
  ``feature_select``, the host drops it after this hook).
- ``tokens`` is the official ``visual_token_num`` (``T``); ``from_ratio`` gives
  the README's ``round(576 * (1 - R))`` (144, 58 and 29 for 75%, 90%, 95%).
  ``tokens=None`` keeps everything. ``T`` is capped at the number of patches.
- Left out: LLaVA-NeXT's any-resolution path (the official code prunes every
  sub-image to ``T`` tokens before the spatial unpadding) and the analysis
  scripts (attention shift and dispersion). Nothing is learned.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, identity, keep_tokens
from reference.registry import register


def cls_attention_prune(
    x: Tensor, size: Tensor, cls_attn: Tensor, prefix: int, tokens: int
) -> Reduction:
    """Keep the prefix and the ``tokens`` patch tokens of ``x`` with the most [CLS] attention.

    Args:
        x: ``[B, N, C]`` vision features at the selected layer.
        size: ``[B, N, 1]`` token sizes.
        cls_attn: ``[B, H, N]`` attention of the CLS query to every token (softmax
            over all ``N`` keys, as in the official code).
        prefix: protected tokens at the front.
        tokens: patch tokens to keep (the official ``visual_token_num``).

    Returns:
        A ``Reduction`` with ``prefix + min(tokens, N - prefix)`` tokens; kept
        patches stay in their original order.
    """
    n = x.shape[1]
    if tokens >= n - prefix:
        return identity(x, size)
    with torch.no_grad():
        score = cls_attn[:, :, prefix:].mean(dim=1)  # [B, N - prefix]
        top = score.topk(tokens, dim=1).indices  # [B, T]
    return keep_tokens(x, size, prefix, top + prefix)


@register
class FasterVLM(TokenReducer):
    """Keep the ``tokens`` patch tokens with the highest [CLS] attention (the paper's ``T``)."""

    catalog_id = "fastervlm"
    kind = "pruning"
    needs = frozenset({"cls_attn"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {"zero": {"tokens": None}, "some": {"tokens": 6}}

    def __init__(self, tokens: int | None = None):
        super().__init__()
        if tokens is not None and tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        self.tokens = tokens

    @classmethod
    def from_ratio(cls, ratio: float, n_image: int = 576) -> FasterVLM:
        """The README's setting for a reduction ratio ``R``: ``round(n_image * (1 - R))``."""
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        return cls(tokens=round(n_image * (1 - ratio)))

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        return {"vision": cls(tokens=keep)}

    def kept(self, n: int, prefix: int) -> int:
        return n - prefix if self.tokens is None else min(self.tokens, n - prefix)

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        out = prefix + self.kept(n, prefix)
        return out, out

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        tokens = self.kept(x.shape[1], signals.prefix)
        return cls_attention_prune(x, signals.size, signals.cls_attn, signals.prefix, tokens)
