"""PPT: Token Pruning and Pooling.

Paper: "PPT: Token Pruning and Pooling for Efficient Vision Transformers",
https://arxiv.org/abs/2310.01812
Official code: https://github.com/xjwu1024/PPT (``ppt_deit.py``: ``PPTAttention``,
``pp_block_adaptive``; ``merge.py``: ToMe's matching)

Algorithm (Sec. 3):
1. After a block's attention, score every image token by ATS's significance: the CLS
   attention to it (summed over heads) times the norm of its value vector, normalised
   to sum to one over the image tokens.
2. The variance of these scores measures how peaked the attention is (Sec. 3.4): per
   image, a variance at or above ``threshold`` means inattentive redundancy, so the
   ``r`` least significant tokens are pruned; below it means duplicative redundancy,
   so ``r`` tokens are pooled by ToMe's bipartite soft matching (size-weighted).
3. Either way ``r`` tokens go, so a batch stays rectangular while each image gets
   its own policy. The official model applies PPT at blocks 3, 6 and 9.

Deviations from the official code:
- Hook: ``"mid"`` (after the attention, before the MLP), as in the official block. The
  CLS attention, values and head-averaged keys come from the host's signals.
- Both policies are computed for the whole batch and each image takes its own (the
  official code splits the batch into two sub-batches); results are the same, at
  the cost of running both.
- Pruned outputs are in descending-score order after the prefix, as in the official
  code; ``spatial_order=True`` keeps them in input order instead. The order matters:
  ToMe's bipartite split is positional, so a later pooling step merges differently.
- PPT builds on ToMe: pooling calls ``reference.tome.merge_wavg``. All ``prefix``
  tokens are protected (official: CLS only); with more than one prefix token the
  pooling follows ``reference.tome`` (prefix kept in front).
- The significance score is computed under ``torch.no_grad()`` (it only selects).
- Nothing is learned; fine-tuning with PPT in place is left to the caller.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from reference.core import (
    Reduction,
    Signals,
    TokenReducer,
    empty_batch,
    gather_tokens,
    identity,
    keep_tokens,
)
from reference.registry import register
from reference.tome import merge_wavg


def significance(cls_attn: Tensor, values: Tensor, prefix: int) -> Tensor:
    """ATS significance of the image tokens, normalised to sum to one.

    Args:
        cls_attn: ``[B, H, N]`` attention of the CLS query.
        values: ``[B, H, N, D]`` attention values.
        prefix: protected tokens at the front.

    Returns:
        ``[B, N - prefix]`` scores ``a_j ||v_j|| / sum_k a_k ||v_k||`` with ``a_j`` the
        CLS attention summed over heads and ``v_j`` the value of token j over all heads.
    """
    b, h, n, d = values.shape
    v_norm = values.transpose(1, 2).reshape(b, n, h * d).norm(dim=-1)  # [B, N]
    score = (cls_attn.sum(dim=1) * v_norm)[:, prefix:]  # [B, N - prefix]
    return score / score.sum(dim=1, keepdim=True)


def keep_in_order(x: Tensor, size: Tensor, prefix: int, keep: Tensor) -> Reduction:
    """The prefix, then the tokens at ``keep [B, K]`` in the order given (not re-sorted)."""
    b, n, _ = x.shape
    pre = torch.arange(prefix, device=x.device).expand(b, prefix)
    index = torch.cat([pre, keep], dim=1)  # [B, prefix + K]
    assign = torch.full((b, n), -1, dtype=torch.long, device=x.device)
    assign.scatter_(1, index, torch.arange(index.shape[1], device=x.device).expand(b, -1))
    return Reduction(
        x=gather_tokens(x, index), size=gather_tokens(size, index), index=index, assign=assign
    )


def ppt_reduce(
    x: Tensor,
    size: Tensor,
    cls_attn: Tensor,
    values: Tensor,
    keys: Tensor,
    prefix: int,
    r: int,
    threshold: float,
    spatial_order: bool = False,
) -> tuple[Reduction, Tensor]:
    """Remove ``r`` tokens of ``x [B, N, C]`` by pruning or pooling, chosen per image.

    Pruned images keep their tokens in descending-score order (official), or in input
    order with ``spatial_order``. Returns the ``Reduction`` and ``pooled [B]`` (True
    where the image was pooled).
    """
    b, n, _ = x.shape
    r = min(r, (n - prefix) // 2)  # ToMe merges at most half of the tokens
    if r <= 0:
        return identity(x, size), torch.zeros(b, dtype=torch.bool, device=x.device)
    if b == 0:  # an empty batch: nothing to score (a variance over no image warns)
        return empty_batch(x, size, n - r), torch.zeros(0, dtype=torch.bool, device=x.device)
    with torch.no_grad():
        score = significance(cls_attn.float(), values.float(), prefix)  # [B, N - prefix]
        pooled = score.var(dim=1) < threshold  # [B], Sec. 3.4's redundancy criterion
        top = score.topk(n - prefix - r, dim=1).indices  # [B, N - prefix - r]
    keep = keep_tokens if spatial_order else keep_in_order
    pruned = keep(x, size, prefix, top + prefix)  # inattentive redundancy
    pooled_out = merge_wavg(x, size, r, prefix, keys)  # duplicative redundancy

    def pick(a: Tensor, p: Tensor) -> Tensor:
        return torch.where(pooled.view(b, *([1] * (a.dim() - 1))), p, a)

    out = Reduction(
        x=pick(pruned.x, pooled_out.x),
        size=pick(pruned.size, pooled_out.size),
        index=pick(pruned.index, pooled_out.index),
        assign=pick(pruned.assign, pooled_out.assign),
    )
    return out, pooled


@register
class PPT(TokenReducer):
    """Remove ``r`` tokens per block, pruning or pooling per image by score variance."""

    catalog_id = "ppt"
    kind = "pruning"
    needs = frozenset({"keys", "cls_attn", "values"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {"zero": {"r": 0}, "some": {"r": 4}}

    def __init__(self, r: int = 0, threshold: float = 7e-5, spatial_order: bool = False):
        """``threshold``: the official DeiT-S setting for 196 image tokens (``eval.sh``);
        ``spatial_order``: pruned tokens in input order instead of score order."""
        super().__init__()
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        self.r = r
        self.threshold = threshold
        self.spatial_order = spatial_order

    @classmethod
    def paper_setting(cls, depth: int, dim: int) -> tuple[dict[int, dict], bool]:
        # The official off-the-shelf DeiT-S setting (``eval.sh``): r = 50 at blocks 3, 6
        # and 9 of 12, threshold 7e-5, proportional attention on.
        step = depth // 4
        return {step * i: {"r": 50, "threshold": 7e-5} for i in (1, 2, 3)}, True

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        kept = n - max(0, min(self.r, (n - prefix) // 2))
        return kept, kept

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        out, _ = ppt_reduce(
            x, signals.size, signals.cls_attn, signals.values, signals.keys,
            signals.prefix, self.r, self.threshold, self.spatial_order,
        )  # fmt: skip
        return out
