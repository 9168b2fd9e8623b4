"""HiRED: High-Resolution Early Dropping of visual tokens within a fixed budget.

Paper: "HiRED: Attention-Guided Token Dropping for Efficient Inference of
High-Resolution Vision-Language Models", https://arxiv.org/abs/2408.10945
Official code: https://github.com/hasanar1f/HiRED
(``transformers/src/transformers/models/llava_next/modeling_llava_next.py``:
``HiRED_token_selection``, ``HiRED_sub_img_budgets``; the same file under ``models/llava/``
for LLaVA-1.5)

Algorithm (Sec. 3), before the projector, with a budget of ``k`` visual tokens:
1. Budget distribution: the top ``(1 - alpha)`` share of tokens by an *early*
   ViT layer's CLS attention (official: layer 0, summed over heads) marks where
   the visual content is; each image partition gets ``k`` in proportion to how
   many of those tokens it holds (floored).
2. Token selection: within each partition keep its quota of tokens with the
   highest *final-layer* CLS attention (official: layer 22, summed over heads).

Deviations from the official code:
- Single image instead of LLaVA-NeXT's full image + sub-images: with ``grid=1``
  (default) this is the official LLaVA-1.5 path (top ``int(N * budget)`` tokens by
  the hook layer's CLS attention, summed over heads). ``grid=g > 1`` maps the
  sub-images onto ``g x g`` spatial tiles of the one token grid, so step 1
  distributes the budget over tiles. The official code's separate full-image
  share (``alpha`` of the budget, a second low-resolution view) has no counterpart;
  ``alpha`` only sets how many early-attention tokens form the distribution.
- The official ``HiRED_sub_img_budgets`` reshapes the flat token mask into
  ``[rows, cols, -1]``, which splits it into bands of consecutive tokens; here
  tiles are spatial blocks of the patch grid, as the paper describes (a count
  that is not a square, e.g. with extra prefix tokens, is laid out row-major on
  ``ceil(sqrt(N))`` columns).
- The budget the floors leave unspent is filled with the best remaining tokens
  by final-layer attention, so every image keeps exactly ``k`` tokens and the batch
  stays rectangular (the official code leaves it unspent).
- Early-layer attention is not a signal of the hook: pass it as
  ``state["early_cls_attn"]`` (``[B, H, N]``, CLS attention row of an early ViT
  layer); without it the hook layer's own CLS attention is used for both steps.
- Kept tokens stay in spatial order, as the official boolean mask does.
- Batches: the official code is batch-1 only (it ranks with batch item 0's attention,
  ``bottom_layer_attn[0]``, and applies that mask to every image); here each sample is
  ranked by its own attention.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, identity, keep_tokens
from reference.ops import descending_rank
from reference.registry import register


def tile_ids(m: int, grid: int, device: torch.device) -> Tensor:
    """``[M]`` the ``grid x grid`` spatial tile of each of ``M`` row-major patch tokens.

    ``M`` tokens lie on ``ceil(sqrt(M))`` columns (a square grid when ``M`` is square).
    """
    cols = math.isqrt(m - 1) + 1 if m > 1 else 1
    rows = -(-m // cols)
    j = torch.arange(m, device=device)
    return (j // cols * grid // rows) * grid + (j % cols) * grid // cols


def hired_keep(score: Tensor, early: Tensor, k: int, grid: int = 1, alpha: float = 0.5) -> Tensor:
    """HiRED's keep set ``[B, M]`` (bool, exactly ``k`` per row).

    Args:
        score: ``[B, M]`` final-layer CLS attention of the patch tokens (step 2).
        early: ``[B, M]`` early-layer CLS attention of the patch tokens (step 1).
        k: the token budget.
    """
    b, m = score.shape
    device = score.device
    if grid == 1:
        return descending_rank(score) < k
    tile = tile_ids(m, grid, device)  # [M]
    n_tiles = grid * grid
    tile_size = torch.bincount(tile, minlength=n_tiles)  # [R]
    # Step 1: quota_r = int(k * share of the top early-attention tokens in tile r).
    marked = descending_rank(early) < int(m * (1 - alpha))  # [B, M]
    hits = torch.zeros(b, n_tiles, device=device).scatter_add_(
        1, tile.expand(b, m), marked.float()
    )  # [B, R]
    share = hits / hits.sum(1, keepdim=True).clamp(min=1)
    quota = torch.minimum((share * k).long(), tile_size)  # [B, R]
    # Step 2: rank within the tile by final-layer attention; keep the tile's quota.
    key = tile * m + descending_rank(score)  # [B, M] tile-major, then by score
    pos = descending_rank(-key)  # ascending position of each token in that order
    start = torch.cumsum(tile_size, 0) - tile_size  # [R] first position of each tile
    keep = (pos - start[tile]) < quota.gather(1, tile.expand(b, m))
    # Fill what the floors left unspent with the best remaining tokens.
    left = k - keep.sum(1, keepdim=True)  # [B, 1]
    rest = descending_rank(score.masked_fill(keep, -torch.inf))
    return keep | (~keep & (rest < left))


@register
class HiRED(TokenReducer):
    """Keep ``int(N * budget)`` patch tokens by CLS attention, spread over ``grid x grid`` tiles."""

    catalog_id = "hired"
    kind = "pruning"
    needs = frozenset({"cls_attn"})
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"budget": 1.0},
        "some": {"budget": 0.25, "grid": 2},
    }

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        # The LLaVA-1.5 path of the official code: one image, top-k by CLS attention.
        return {"vision": cls(budget=keep / n_image)}

    def __init__(self, budget: float = 0.2, alpha: float = 0.5, grid: int = 1):
        super().__init__()
        if not 0 <= budget <= 1:
            raise ValueError(f"budget must be in [0, 1], got {budget}")
        if not 0 <= alpha <= 1 or grid < 1:
            raise ValueError(f"need 0 <= alpha <= 1 and grid >= 1, got {alpha}, {grid}")
        self.token_budget, self.alpha, self.grid = budget, alpha, grid

    def kept(self, m: int) -> int:
        return min(m, int(m * self.token_budget))

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        k = prefix + self.kept(n - prefix)
        return k, k

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        prefix = signals.prefix
        m = x.shape[1] - prefix
        k = self.kept(m)
        if k >= m:
            return identity(x, signals.size)
        with torch.no_grad():
            score = signals.cls_attn.float().sum(1)[:, prefix:]  # [B, M] summed over heads
            early = signals.state.get("early_cls_attn", signals.cls_attn)
            early = early.float().sum(1)[:, -m:]  # the last M columns are the patches
            keep = hired_keep(score, early, k, self.grid, self.alpha)  # [B, M]
            idx = (~keep).int().argsort(dim=1, stable=True)[:, :k]  # [B, k] kept positions
        return keep_tokens(x, signals.size, prefix, idx + prefix)
