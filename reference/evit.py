"""EViT: attentive-token keeping with inattentive-token fusion.

Paper: "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", https://arxiv.org/abs/2202.07800
Official code: https://github.com/youweiliang/evit (``evit.py``: ``Attention``, ``Block``)

Algorithm (token reorganization):
1. Between the attention and the MLP of a block, score every image token by the
   attention the CLS query pays to it, averaged over heads.
2. Keep the ``ceil(keep_rate * N)`` most attentive image tokens (top-k).
3. Fuse the inattentive rest into one new token, the sum of those tokens weighted
   by their CLS attention, appended after the kept tokens; the MLP then runs on
   the shorter sequence. The official model reorganizes at blocks 4, 7 and 10.

Deviations from the official code:
- Hook: ``"mid"`` (after attention, before the MLP), exactly where the official
  ``Block`` reorganizes; the CLS attention comes from the host's ``cls_attn``
  signal instead of the block's full attention map.
- The CLS-attention scores are read under ``torch.no_grad()`` (the host computes
  them on the side), so the fusion weights pass no gradient back into the
  queries and keys; the official code lets that gradient flow.
- Kept tokens are returned in their original (spatial) order; the official code
  returns them in descending-score order. Attention is permutation-equivariant,
  so the CLS output is the same.
- All ``prefix`` tokens are protected (the official code protects the CLS token
  only) and excluded from the scores and the keep count.
- The fused token's ``size`` is the sum of what it absorbed (the official code
  has no sizes; they only matter with the host's proportional attention).
- Training recipe left out: the official code anneals the keep rate from 1 to
  its target with a cosine schedule after warm-up (``adjust_keep_rate``); set
  ``keep_rate`` from outside to reproduce it. No parameters are learned.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, identity, keep_tokens
from reference.registry import register


def num_kept(n: int, prefix: int, keep_rate: float) -> int:
    """Image tokens kept of ``n`` tokens (official: ``ceil(keep_rate * (N - 1))``)."""
    return min(n - prefix, math.ceil(keep_rate * (n - prefix)))


def evit_reorganize(
    x: Tensor, size: Tensor, cls_attn: Tensor, prefix: int, keep_rate: float, fuse: bool = True
) -> Reduction:
    """Keep the most attentive tokens of ``x [B, N, C]``, fuse the rest into one token.

    Args:
        x: ``[B, N, C]`` tokens after the block's attention.
        size: ``[B, N, 1]`` token sizes.
        cls_attn: ``[B, H, N]`` attention of the CLS query to every token.
        prefix: protected tokens at the front.
        keep_rate: fraction of the image tokens to keep.
        fuse: append the attention-weighted fusion of the dropped tokens.

    Returns:
        A ``Reduction`` with ``prefix + k (+ 1)`` tokens; the fused token is last
        and has ``index == -1``.
    """
    b, n, _ = x.shape
    k = num_kept(n, prefix, keep_rate)
    if k >= n - prefix:
        return identity(x, size)
    with torch.no_grad():
        attentiveness = cls_attn[:, :, prefix:].mean(dim=1)  # [B, N - prefix]
        top = attentiveness.topk(k, dim=1).indices  # [B, k]
    kept = keep_tokens(x, size, prefix, top + prefix)
    if not fuse:
        return kept

    # Inattentive token fusion: x_fused = sum_{i dropped} a_i x_i with the raw CLS
    # attention a_i as weight (the official code does not renormalize them).
    dropped = torch.ones_like(attentiveness, dtype=torch.bool).scatter(1, top, False)  # [B, N-p]
    weight = (attentiveness * dropped).to(x.dtype)  # zero on the kept tokens
    fused = (weight.unsqueeze(-1) * x[:, prefix:]).sum(dim=1, keepdim=True)  # [B, 1, C]
    fused_size = (dropped.unsqueeze(-1) * size[:, prefix:]).sum(dim=1, keepdim=True)  # [B, 1, 1]

    slot = kept.num_tokens  # the fused token's output slot
    index = torch.cat([kept.index, kept.index.new_full((b, 1), -1)], dim=1)
    assign = torch.where(kept.assign < 0, slot, kept.assign)  # dropped tokens went into it
    return Reduction(
        x=torch.cat([kept.x, fused], dim=1),
        size=torch.cat([kept.size, fused_size.to(size.dtype)], dim=1),
        index=index,
        assign=assign,
    )


@register
class EViT(TokenReducer):
    """Keep the top ``keep_rate`` of image tokens by CLS attention; fuse the rest."""

    catalog_id = "evit"
    kind = "pruning"
    needs = frozenset({"cls_attn"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"keep_rate": 1.0},
        "some": {"keep_rate": 0.5},
    }

    @classmethod
    def paper_setting(cls, depth: int, dim: int) -> tuple[dict[int, dict], bool]:
        # The official DeiT-S/B default (``base_keep_rate=0.7``, ``drop_loc=(3, 6, 9)``).
        step = depth // 4
        return {step * i: {"keep_rate": 0.7} for i in (1, 2, 3)}, False

    def __init__(self, keep_rate: float = 1.0, fuse: bool = True):
        super().__init__()
        if not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        self.keep_rate = keep_rate
        self.fuse = fuse

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        k = num_kept(n, prefix, self.keep_rate)
        out = n if k >= n - prefix else prefix + k + int(self.fuse)
        return out, out

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        return evit_reorganize(
            x, signals.size, signals.cls_attn, signals.prefix, self.keep_rate, self.fuse
        )
