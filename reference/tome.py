"""ToMe: Token Merging.

Paper: "Token Merging: Your ViT But Faster", https://arxiv.org/abs/2210.09461
Official code: https://github.com/facebookresearch/ToMe (``tome/merge.py``, ``tome/patch/timm.py``)

Algorithm (bipartite soft matching, Sec. 3):
1. Split the tokens alternately into sets A and B; score every A-B pair by the
   cosine similarity of their head-averaged attention keys.
2. Each A token keeps its best B match; the ``r`` A tokens with the highest
   scores are merged into their match by a size-weighted average.
3. Token sizes add up, and later attention adds ``log(size)`` to its logits
   (proportional attention, Eq. 1) so a merged token counts as many.

As in the official code, the kept A tokens are put back in input order only when
there is a prefix token (the official ``class_token=True``); without one they stay
in descending-score order; ``always_sort=True`` sorts them in that case too.

Deviations from the official code:
- Any number of prefix tokens: they alternate between excluded A rows and B
  columns and the output is ordered prefix, kept A, B. For CLS (an A row) and a
  distillation token (a B column) this is the official code, which knows no more.
- Returns ``index``/``assign`` instead of the official ``merge``/``unmerge``
  closures; source tracing (``trace_source``) is not implemented.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, gather_tokens, identity
from reference.registry import register


def bipartite_soft_matching(
    metric: Tensor, r: int, prefix: int, always_sort: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Plan one ToMe step on ``metric [B, N, D]``.

    Returns ``unm_idx [B, Na-r]`` (A tokens kept), ``src_idx [B, r]`` (A tokens
    merged), ``dst_idx [B, r]`` (their B destinations), all indexing into the A or
    B halves, and ``node_max [B, Na]``. ``unm_idx`` is in input order when there is
    a prefix token or ``always_sort``, else in descending-score order (official).
    """
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]
        # Prefix tokens are neither merged (A rows) nor merged into (B columns).
        scores[:, : (prefix + 1) // 2, :] = -torch.inf
        scores[:, :, : prefix // 2] = -torch.inf
        node_max, node_idx = scores.max(dim=-1)  # [B, Na]
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unm_idx = edge_idx[:, r:]
        if prefix > 0 or always_sort:  # puts the prefix tokens (A side) back in front
            unm_idx = unm_idx.sort(dim=-1).values
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx.gather(1, src_idx)
    return unm_idx, src_idx, dst_idx, node_max


def merge_wavg(
    x: Tensor,
    size: Tensor,
    r: int,
    prefix: int,
    metric: Tensor,
    always_sort: bool = False,
) -> Reduction:
    """Merge ``r`` tokens of ``x [B, N, C]`` by size-weighted average (``merge_wavg``).

    ``always_sort`` as in ``bipartite_soft_matching``; it only changes the output order.
    """
    b, n, _ = x.shape
    r = min(r, (n - prefix) // 2)
    if r <= 0:
        return identity(x, size)
    unm_idx, src_idx, dst_idx, _ = bipartite_soft_matching(metric, r, prefix, always_sort)

    def merge(t: Tensor) -> Tensor:
        src, dst = t[:, ::2], t[:, 1::2]
        unm = gather_tokens(src, unm_idx)
        moved = gather_tokens(src, src_idx)
        dst = dst.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, t.shape[-1]), moved, "sum")
        return torch.cat([unm, dst], dim=1)  # [B, N - r, C]

    merged_size = merge(size)
    out = merge(x * size) / merged_size

    # Where every token went (A token i is token 2i, B token j is token 2j + 1).
    n_unm = unm_idx.shape[1]
    n_b = n // 2
    index = torch.cat([2 * unm_idx, 2 * torch.arange(n_b, device=x.device).expand(b, n_b) + 1], 1)
    assign = torch.empty(b, n, dtype=torch.long, device=x.device)
    slots_unm = torch.arange(n_unm, device=x.device).expand(b, -1)
    assign.scatter_(1, 2 * unm_idx, slots_unm)
    assign.scatter_(1, 2 * src_idx, n_unm + dst_idx)
    assign[:, 1::2] = n_unm + torch.arange(n_b, device=x.device)

    if prefix > 1:
        # Prefix tokens on the B side sit at the front of the dst block: move them
        # right after the A-side prefix tokens so every prefix token stays in place.
        n_pre_a, n_pre_b = (prefix + 1) // 2, prefix // 2
        order = torch.arange(out.shape[1], device=x.device)
        b_pre = order[n_unm : n_unm + n_pre_b]
        rest_a = order[n_pre_a:n_unm]
        rest_b = order[n_unm + n_pre_b :]
        # Prefix positions 0..prefix-1 alternate A, B, as in the input.
        pre_order = torch.empty(prefix, dtype=torch.long, device=x.device)
        pre_order[0::2] = order[:n_pre_a]
        pre_order[1::2] = b_pre
        perm = torch.cat([pre_order, rest_a, rest_b])
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=x.device)
        out, merged_size, index = out[:, perm], merged_size[:, perm], index[:, perm]
        assign = inverse[assign]
    return Reduction(x=out, size=merged_size, index=index, assign=assign)


@register
class ToMe(TokenReducer):
    """Merge ``r`` tokens per block; use with ``proportional_attn=True`` on the host."""

    catalog_id = "tome"
    kind = "merging"
    needs = frozenset({"keys"})

    test_configs: ClassVar[dict[str, dict]] = {"zero": {"r": 0}, "some": {"r": 4}}

    def __init__(self, r: int = 0, always_sort: bool = False):
        super().__init__()
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        self.r = r
        self.always_sort = always_sort  # False: sort only with a prefix token (official)

    @classmethod
    def paper_setting(cls, depth: int, dim: int) -> tuple[dict[int, dict], bool]:
        # The official README's off-the-shelf ViT-B/16 setting: r = 13 in every block.
        return {layer: {"r": 13} for layer in range(depth)}, True

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        kept = n - max(0, min(self.r, (n - prefix) // 2))
        return kept, kept

    def keeps_all(self, n: int, prefix: int) -> bool:
        return min(self.r, (n - prefix) // 2) <= 0  # merge_wavg's identity

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        return merge_wavg(x, signals.size, self.r, signals.prefix, signals.keys, self.always_sort)
