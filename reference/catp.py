"""CATP: Cross-Attention Token Pruning.

Paper: "CATP: Cross-Attention Token Pruning for Accuracy Preserved Multimodal Model
Inference", https://arxiv.org/abs/2404.08567
Official code: none is linked from the paper; the algorithm follows the paper and the
LAVIS fork https://github.com/Vic0428/LAVIS (``lavis/models/blip2_models/blip2_pruning.py``,
``cross_attention_pruning`` and ``cross_attention_pruning_with_image_weight``, read at
commit d16b4d1, its head), whose README calls it "our cross-attention pruning method"
(authorship not confirmed).

Algorithm (BLIP-2: prune the Q-Former's query tokens before they enter the LLM):
1. Take the Q-Former's cross-attention probabilities ``[H, Nq, M]`` (query tokens x
   image tokens) of its last cross-attention layer (or their sum over all layers).
2. Every (head, image token) pair votes: it ranks the ``Nq`` query tokens by the
   attention it receives from them, giving rank 0 to the lowest and ``Nq - 1`` to
   the highest; a query's score is the sum of its ranks (a Borda count).
3. Optionally each image token's column is first multiplied by its importance in the
   image encoder (the L2-normalised attention it receives in the encoder's last
   self-attention layer); keep the ``Nq // downsample`` best query tokens, in order.

Deviations from the official code:
- Host mapping: the LLaVA host has no Q-Former, so the tokens pruned are the vision
  tokens at the host's vision hook (CLS = prefix, kept), which stand in for BLIP-2's
  query tokens on their way to the language model. The cross-attention maps are an
  input: ``state["cross_attn"]`` ``[B, L, H, N - prefix, M]`` (one query row per
  non-prefix token) and, for image weights, ``state["image_attn"]`` ``[B, H, M, M]``.
  Without them, the hooked layer's self-attention stands in: its rows of the
  non-prefix tokens are the "cross-attention" (one layer) and the whole map is the
  image encoder's attention (``needs = {"attn"}``).
- Image weights: as at the repository's head, they scale the cross-attention before
  ranking (earlier commits took a softmax, then L2-normalised). A column scaled by
  one positive weight ranks its queries the same way, so the weights change the
  votes only where a weight is 0 (the column's ranks then follow position); with
  positive weights ``image_weight=True`` keeps the same tokens as ``False``, at the
  head as here (``tests/reference/fixtures/catp.json``).
- Batched and vectorised (the repository loops over samples); ties in a ranking are
  broken by position (stable sort) instead of unspecified ``argsort`` order.
- Prefix tokens are protected and not scored; no parameters are learned.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, identity, keep_tokens
from reference.registry import register


def num_kept(n: int, prefix: int, downsample: int) -> int:
    """Query tokens kept of ``n`` tokens (official: ``seq_len // downsample``)."""
    return (n - prefix) // downsample


def image_weights(image_attn: Tensor) -> Tensor:
    """Image-token vote weights ``[B, M]`` from the image encoder's attention ``[B, H, M, M]``.

    The attention each one receives (summed over heads and queries), L2-normalised
    over the image tokens, as the repository's image-weight variant computes it.
    """
    return F.normalize(image_attn.float().sum(dim=(1, 2)), dim=-1)


def cross_attention_votes(
    cross_attn: Tensor, all_layers: bool = False, weight: Tensor | None = None
) -> Tensor:
    """Borda-count score of every query token.

    Args:
        cross_attn: ``[B, L, H, Nq, M]`` cross-attention probabilities (query x image).
        all_layers: sum the maps over layers before ranking; else use the last layer.
        weight: ``[B, M]`` optional per-image-token weights, applied to the maps
            before ranking.

    Returns:
        ``[B, Nq]`` summed ranks (higher = more attended by the image tokens).
    """
    with torch.no_grad():
        attn = cross_attn.sum(1) if all_layers else cross_attn[:, -1]  # [B, H, Nq, M]
        if weight is not None:
            attn = attn.float() * weight[:, None, None, :].float()
        # Rank of each query token within a (head, image token) column: 0 = least attending.
        ranks = attn.argsort(dim=2, stable=True).argsort(dim=2).float()  # [B, H, Nq, M]
        return ranks.sum(dim=(1, 3))


def catp_prune(
    x: Tensor,
    size: Tensor,
    prefix: int,
    cross_attn: Tensor,
    downsample: int,
    all_layers: bool = False,
    weight: Tensor | None = None,
) -> Reduction:
    """Keep the prefix and the ``(N - prefix) // downsample`` best-voted tokens of ``x``.

    ``x [B, N, C]``; ``cross_attn [B, L, H, N - prefix, M]``; ``weight [B, M]``.
    """
    n = x.shape[1]
    if cross_attn.shape[-2] != n - prefix:
        raise ValueError(
            f"cross_attn has {cross_attn.shape[-2]} query rows, expected {n - prefix} "
            "(one per non-prefix token)"
        )
    k = num_kept(n, prefix, downsample)
    if k == n - prefix:
        return identity(x, size)
    scores = cross_attention_votes(cross_attn, all_layers, weight)  # [B, N - prefix]
    keep = scores.topk(k, dim=1).indices + prefix
    return keep_tokens(x, size, prefix, keep)


@register
class CATP(TokenReducer):
    """Keep ``1 / downsample`` of the tokens, ranked by cross-attention votes."""

    catalog_id = "catp"
    kind = "pruning"
    needs = frozenset({"attn"})
    where = "mid"
    basis = "the paper and a LAVIS fork that presents the method as its own (no linked code)"
    test_configs: ClassVar[dict[str, dict]] = {"zero": {"downsample": 1}, "some": {"downsample": 2}}

    def __init__(self, downsample: int = 1, all_layers: bool = False, image_weight: bool = False):
        super().__init__()
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        self.downsample = downsample
        self.all_layers = all_layers
        self.image_weight = image_weight

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        kept = prefix + num_kept(n, prefix, self.downsample)
        return kept, kept

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        prefix = signals.prefix
        cross_attn = signals.state.get("cross_attn")
        image_attn = signals.state.get("image_attn")
        if cross_attn is None:  # the hooked layer's self-attention stands in (one layer)
            cross_attn = signals.attn[:, None, :, prefix:, :]  # [B, 1, H, N - prefix, N]
            image_attn = signals.attn
        weight = None
        if self.image_weight:
            if image_attn is None:
                raise ValueError('image_weight needs state["image_attn"] with state["cross_attn"]')
            weight = image_weights(image_attn)
        return catp_prune(
            x, signals.size, prefix, cross_attn, self.downsample, self.all_layers, weight
        )
