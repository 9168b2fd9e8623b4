"""CrossGET: Cross-Guided Ensemble of Tokens.

Paper: "CrossGET: Cross-Guided Ensemble of Tokens for Accelerating Vision-Language
Transformers", https://arxiv.org/abs/2305.17455
Official code: https://github.com/sdc17/CrossGET (``CLIP/clip/reducer.py``,
``LLaVA/llava/model/reducer.py``: ``TokenReduction.match`` and ``merge``)

Algorithm (one reduction step after a block's attention):
1. Cross-guided importance: each token's cosine similarity to the other modality's
   cross token (a learnable token whose target is the text's summary).
2. Complete-graph soft matching: order tokens by their best cosine similarity of
   attention keys (highest first); a token may only be matched to tokens ranked
   after it, so no pair is matched twice. Score = importance - best allowed
   similarity; the ``r`` lowest-scoring tokens are sources, the rest destinations.
3. Each source joins its most similar destination; cross-guided ensemble: the pair
   is averaged with weights ``softmax([importance_src, importance_dst])`` (with
   unit sizes ``w_s x_s + w_d x_d``); sizes add up; the token order is kept.

Deviations from the official code:
- Cross-modal guidance: the guide is the mean of ``state["text"]`` ``[B, T, C]``
  (text features in the vision feature space), compared with the tokens ``x``; the
  official code compares attention keys with the query of a learnable cross token
  that a distillation loss pulls towards the text's cross token. The learnable cross
  tokens, their per-layer parameters and that loss are left out (nothing is learned
  here). Without ``state["text"]``, the CLS token is the guide: the official vision
  cross token is initialised from CLS (``cross_image`` from ``class_embedding``).
- Host hook: ``"mid"``, as in the official blocks; in the LLaVA host the vision hook
  runs after the selected block. All ``prefix`` tokens are protected (the official
  code protects CLS and the cross token).
- The ensemble formula with several sources per destination, and ``r`` capped at
  ``(N - prefix - suffix) // 2``, follow the official ``merge`` exactly. The similarity is
  symmetric, so a mutually nearest pair ties in the ranking (exactly, on CPU); by default
  (``stable=False``) the ties go as the official (unstable) ``argsort`` orders them on
  the device, so results can differ between devices; ``stable=True`` breaks every tie
  by position instead. ``suffix`` protects trailing tokens (the official cross token is
  the last one).
- The LLaVA variant of the official code scores importance from attention maps
  (mean attention received plus the cross token's attention); not implemented.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, gather_tokens, identity
from reference.registry import register


def cross_guided_importance(x: Tensor, guide: Tensor) -> Tensor:
    """Cosine similarity of ``x [B, N, C]`` to ``guide [B, C]`` -> ``[B, N]``."""
    with torch.no_grad():
        return F.cosine_similarity(x.float(), guide.float()[:, None, :], dim=-1)


def complete_graph_match(
    metric: Tensor, importance: Tensor, r: int, prefix: int, suffix: int = 0, stable: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Plan one CrossGET step (official ``match``).

    Args:
        metric: ``[B, N, D]`` attention keys averaged over heads.
        importance: ``[B, N]`` cross-guided importance.
        r: tokens to merge away; prefix, suffix: protected leading and trailing tokens.
        stable: break ties by position instead of as the official unstable ``argsort``.

    Returns:
        ``src [B, r]`` source tokens, ``dst_all [B, N - r]`` the other tokens,
        ``dst [B, r]`` each source's destination (index into ``dst_all``), and
        ``weight [B, r, 2]`` the ensemble weights of (source, destination).
    """
    with torch.no_grad():
        n = metric.shape[1]
        metric = F.normalize(metric.float(), dim=-1)
        sim = metric @ metric.transpose(-1, -2)  # [B, N, N] cosine
        blocked = torch.eye(n, dtype=torch.bool, device=metric.device)
        blocked[:prefix, :] = blocked[:, :prefix] = True
        blocked[n - suffix :, :] = blocked[:, n - suffix :] = True
        sim = sim.masked_fill(blocked, -torch.inf)
        # Complete graph without conflicts: rank tokens by their best similarity; a
        # token may only be matched to tokens ranked after it.
        best_any = sim.max(-1, keepdim=True).values  # [B, N, 1]: the official sort layout
        order = best_any.argsort(dim=1, descending=True, stable=stable)[..., 0]  # [B, N]
        rank = order.argsort(-1)
        allowed = rank[:, None, :] > rank[:, :, None]  # [B, N, N]
        best = sim.masked_fill(~allowed, -torch.inf).max(-1).values  # [B, N]
        # Cross guidance: important tokens and tokens without a close match stay.
        edge = (importance.float() - best)[..., None].argsort(dim=1, stable=stable)[..., 0]
        src, dst_all = edge[:, :r], edge[:, r:]
        sim_sd = sim.gather(1, src[..., None].expand(-1, -1, n)).gather(
            2, dst_all[:, None, :].expand(-1, r, -1)
        )  # [B, r, N - r]
        dst = sim_sd.argmax(-1)  # [B, r]
        imp_src = importance.float().gather(1, src)
        imp_dst = importance.float().gather(1, dst_all).gather(1, dst)
        weight = torch.stack([imp_src, imp_dst], -1).softmax(-1)  # [B, r, 2]
    return src, dst_all, dst, weight


def crossget_merge(
    x: Tensor,
    size: Tensor,
    prefix: int,
    metric: Tensor,
    importance: Tensor,
    r: int,
    suffix: int = 0,
    stable: bool = False,
) -> Reduction:
    """Merge ``r`` tokens of ``x [B, N, C]`` by cross-guided ensemble (official ``merge``)."""
    b, n, c = x.shape
    r = min(r, (n - prefix - suffix) // 2)
    if r <= 0:
        return identity(x, size)
    src, dst_all, dst, weight = complete_graph_match(metric, importance, r, prefix, suffix, stable)
    weight = (2 * weight).to(x.dtype)  # official: weight *= weight.shape[-1]
    xs = x * size  # [B, N, C]
    x_dst = gather_tokens(xs, dst_all)  # [B, N - r, C]
    # Each source adds w_s * x_s + (w_d - 1) * x_d to its destination's sum.
    update = weight[..., :1] * gather_tokens(xs, src) + (weight[..., 1:] - 1) * gather_tokens(
        x_dst, dst
    )
    x_dst = x_dst.scatter_add(1, dst[..., None].expand(-1, -1, c), update)
    s_dst = gather_tokens(size, dst_all).scatter_add(1, dst[..., None], gather_tokens(size, src))
    # Back to the original token order.
    index, perm = dst_all.sort(-1)  # [B, N - r]
    out = gather_tokens(x_dst / s_dst, perm)
    merged_size = gather_tokens(s_dst, perm)
    assign = torch.empty(b, n, dtype=torch.long, device=x.device)
    slots = perm.argsort(-1)  # slot of each dst_all entry
    assign.scatter_(1, dst_all, slots)
    assign.scatter_(1, src, slots.gather(1, dst))
    return Reduction(x=out, size=merged_size, index=index, assign=assign)


@register
class CrossGET(TokenReducer):
    """Merge ``r`` tokens per step, guided by the text features in ``state["text"]``."""

    catalog_id = "crossget"
    kind = "merging"
    needs = frozenset({"keys"})
    where = "mid"
    test_configs: ClassVar[dict[str, dict]] = {"zero": {"r": 0}, "some": {"r": 4}}

    def __init__(self, r: int = 0, stable: bool = False):
        super().__init__()
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        self.r, self.stable = r, stable

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        kept = n - max(0, min(self.r, (n - prefix) // 2))
        return kept, kept

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        text = signals.state.get("text")
        guide = x[:, 0] if text is None else text.mean(1)  # [B, C]
        importance = cross_guided_importance(x, guide)
        return crossget_merge(
            x, signals.size, signals.prefix, signals.keys, importance, self.r, stable=self.stable
        )
