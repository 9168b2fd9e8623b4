"""AS-ViT: Adaptive Sparse ViT.

Paper: "Adaptive Sparse ViT: Towards Learnable Adaptive Token Pruning by Fully
Exploiting Self-Attention", https://arxiv.org/abs/2209.13802
Official code: the catalog lists none. https://github.com/Cydia2018/AS-ViT
("Implement of Adaptive Sparse ViT"; ``vit.py``: ``Attention``,
``AdaptiveSparsityModule``, ``VisionTransformerDiffPruning``), which a public
list of token-pruning papers links as the paper's code but whose authorship is not
confirmed, was read as the reference; "the official code" below means it.

Algorithm:
1. Token score: the CLS attention to token j in each head, weighted by that head's
   token-level importance (the norm of head h's attention output at token j,
   normalized over the heads), summed over the heads.
2. Each pruning stage owns one learnable threshold; a token whose score exceeds it
   is kept, so every image keeps its own number of tokens.
3. Training keeps the token count fixed: a straight-through sigmoid mask
   ``sigmoid((score - threshold) / tau)`` (hard in the forward pass) masks the
   pruned tokens, and a budget-aware loss on the resulting FLOPs trains the
   thresholds.

Deviations from the official code:
- Hook: ``"mid"`` of the block whose attention gives the score; the official code
  scores with block l's attention and drops the tokens before block l+1, so here
  the MLP of block l already runs on the kept tokens only.
- Batches: the official code keeps, for a batch of several images, the top-k of
  every image with k the batch-mean count of tokens over the threshold (an image's
  result depends on its batch). Here every image keeps exactly its tokens over the
  threshold; the batch is padded to the largest count with *empty slots* (x 0,
  size 0, index -1, ``Reduction.mask`` 0) after each image's own tokens. The hosts
  mask empty slots out of attention, so an image's result does not depend on its
  batch.
  Later AS-ViT / A-ViT steps never keep a slot of size 0.
- ``max_keep`` (default 1.0, i.e. off) caps the kept fraction of an image's
  tokens entering a step (the highest scores stay); it is not in the paper and
  only gives ``budget`` an upper bound below ``n`` for a configuration.
- The score is computed under ``torch.no_grad()`` (house rule for scores that are
  not learned), so the budget loss trains the thresholds only; the official code
  also back-propagates it through the attention maps.
- Training: the mask is returned in ``Reduction.mask`` and tokens are not
  removed; the official code applies it as an attention policy (as DynamicViT),
  and so does the ViT host. The mask is multiplied with the previous
  stage's mask (kept in ``signals.state``) so dropped tokens stay dropped; the
  official code relies on the masked attention to push their scores to ~0.
- The budget-aware loss, the distillation losses and the optional score
  accumulation over layers (``accu`` / ``ema_accu``) are not implemented; the
  stage masks are collected in ``signals.state["adaptive_sparse_vit"]["masks"]``
  for a training loop's budget loss.
- All ``prefix`` tokens are protected and excluded from the scores; kept tokens
  are returned in spatial order (the official code orders them by score).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity
from reference.ops import cap_keep, keep_padded
from reference.registry import register


def head_weighted_cls_attention(attn: Tensor, values: Tensor) -> Tensor:
    """Head-importance-weighted class attention of every token (the token score).

    Args:
        attn: ``[B, H, N, N]`` attention probabilities.
        values: ``[B, H, N, D]`` attention values.

    Returns:
        ``[B, N]`` float32 scores ``sum_h A_h[0, j] * w_hj`` with the token-level head
        importance ``w_hj = ||(A_h V_h)_j|| / sum_h' ||(A_h' V_h')_j||``.
    """
    with torch.no_grad():
        head_out = attn.float() @ values.float()  # [B, H, N, D] per-head outputs
        importance = head_out.norm(dim=-1)  # [B, H, N]
        importance = importance / (importance.sum(dim=1, keepdim=True) + 1e-8)
        return (attn[:, :, 0].float() * importance).sum(dim=1)  # [B, N]


def threshold_mask(score: Tensor, threshold: Tensor, tau: float) -> Tensor:
    """Straight-through keep mask: hard ``score > threshold``, gradient of the sigmoid."""
    soft = torch.sigmoid((score - threshold) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


@register
class AdaptiveSparseViT(TokenReducer):
    """One AS-ViT pruning stage with its learnable keep threshold."""

    catalog_id = "adaptive_sparse_vit"
    basis = "an unofficial repository (Cydia2018/AS-ViT; authorship unconfirmed)"
    kind = "pruning"
    needs = frozenset({"attn", "values"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"threshold": -1.0},
        "some": {"threshold": 0.06, "max_keep": 0.75},
    }

    def __init__(self, threshold: float = 1e-3, tau: float = 1e-4, max_keep: float = 1.0):
        super().__init__()
        if not 0 < max_keep <= 1:
            raise ValueError(f"max_keep must be in (0, 1], got {max_keep}")
        # Official initial thresholds for three stages: 1e-3, 2e-3, 3e-3.
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))
        self.tau = tau
        self.max_keep = max_keep

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        return prefix, prefix + int(self.max_keep * (n - prefix))

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        prefix, size = signals.prefix, signals.size
        if x.shape[0] == 0 and not self.training:  # an empty batch: the budget's shapes
            return empty_batch(x, signals.size, self.budget(x.shape[1], prefix)[0])
        score = head_weighted_cls_attention(signals.attn, signals.values)[:, prefix:]  # [B, M]
        present = size[:, prefix:, 0] > 0  # empty slots of an earlier step stay out
        if self.training:
            state = signals.state.setdefault("adaptive_sparse_vit", {"masks": []})
            prev = state.get("mask")
            if prev is None or prev.shape != score.shape:
                prev = present.to(score.dtype)
            keep = threshold_mask(score, self.threshold.float(), self.tau) * prev  # [B, M]
            # The cap overrides the threshold (no gradient for the tokens it drops).
            hard = keep > 0.5
            keep = keep.masked_fill(hard & ~cap_keep(hard, score, self.max_keep, prev > 0), 0)
            state["mask"] = keep
            state["masks"].append(keep)
            ar = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            mask = torch.cat([keep.new_ones(x.shape[0], prefix), keep], dim=1).to(x.dtype)
            return Reduction(x=x, size=size, index=ar, assign=ar, mask=mask)
        keep = (score > self.threshold.float()) & present
        keep = cap_keep(keep, score, self.max_keep, present)
        if bool(keep.all()):
            return identity(x, size)
        return keep_padded(x, size, prefix, keep)
