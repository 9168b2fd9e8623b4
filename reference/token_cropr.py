"""Token Cropr: cross-attention pruning with auxiliary heads.

Paper: "Token Cropr: Faster ViTs for Quite a Few Tasks", https://arxiv.org/abs/2412.00965
Official code: https://github.com/benbergner/cropr (``cls/cropr.py``, ``cls/vision_transformer.py``)

Algorithm:
1. After a block, a router scores every token by the attention logit of a few
   learned queries against it (summed over queries and heads); the ``r``
   lowest-scoring tokens are pruned, CLS is always kept.
2. In training the same queries cross-attend the (gradient-stopped) tokens, and
   the aggregated query feeds an auxiliary task head; its loss is what trains
   the router, the backbone never gets gradients through the router.
3. At inference only the scorer runs (no softmax, values, MLP or head).
4. Last Layer Fusion (LLF): the pruned tokens skip the remaining blocks and are
   concatenated back in front of the last block (useful for dense tasks).

Deviations from the official code:
- Host mapping: a router that runs after block ``l`` here sits at the ``"pre"``
  hook of block ``l + 1`` (same place in the network). ``cropr_reducers`` builds
  the official placement (after every block but the last; with LLF, after every
  block but the last two, plus ``LastLayerFusion`` in front of the last block);
  the official extra token pruned by the first router (``schedule[0] += 1``) is
  left to the caller.
- Every prefix token is protected (the official code protects index 0 only).
  As in the official ``Cropr.prune``, the kept tokens follow the prefix in
  descending score order, and LLF restores the pruned ones in descending score
  order; ``score_order=False`` keeps both in their original (spatial) order
  instead (same token sets).
- Training keeps the official hard pruning. Because the host ignores auxiliary
  losses, ``Reduction.mask`` is added: it equals 1 on every kept token in value,
  with the straight-through gradient of the router's softmax weights, so that a
  training loop (and the shared contract) reaches the queries through it; the
  official router learns only from the auxiliary heads. The hosts do not apply
  this mask to attention (``masks_attention`` is False).
- Auxiliary logits (``num_classes > 0``) are appended to
  ``signals.state["token_cropr.aux_logits"]``; the training loop adds their
  cross-entropy (the official loss sums them unweighted with the main loss);
  with several queries their aggregated features are averaged before the head
  (the official code assumes a single query there).
  Segmentation heads, the training schedule and the MAE fine-tuning recipe are
  left out.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, gather_tokens, identity, keep_tokens
from reference.registry import register

AUX_KEY = "token_cropr.aux_logits"
PRUNED_KEY = "token_cropr.pruned"


def router_logits(x: Tensor, queries: Tensor, num_heads: int) -> Tensor:
    """Unscaled query-key logits ``[B, H, M, N]`` of ``queries [M, C]`` against ``x [B, N, C]``."""
    b, n, c = x.shape
    m = queries.shape[0]
    q = queries.reshape(m, num_heads, c // num_heads).transpose(0, 1)  # [H, M, D]
    k = x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)  # [B, H, N, D]
    return q @ k.transpose(-1, -2)  # [B, H, M, N]


def cropr_prune(
    x: Tensor, size: Tensor, scores: Tensor, r: int, prefix: int, score_order: bool = True
) -> Reduction:
    """Keep the prefix and the ``N - prefix - r`` highest-``scores [B, N]`` tokens.

    With ``score_order`` (official) the kept tokens follow the prefix best first,
    otherwise in their original order.
    """
    b, n, _ = x.shape
    r = max(0, min(r, n - prefix))
    if r == 0:
        return identity(x, size)
    keep = scores[:, prefix:].topk(n - prefix - r, dim=1).indices + prefix  # [B, K], best first
    if not score_order:
        return keep_tokens(x, size, prefix, keep)
    pre = torch.arange(prefix, device=x.device).expand(b, prefix)
    index = torch.cat([pre, keep], dim=1)  # [B, N - r]
    assign = torch.full((b, n), -1, dtype=torch.long, device=x.device)
    assign.scatter_(1, index, torch.arange(index.shape[1], device=x.device).expand(b, -1))
    return Reduction(
        x=gather_tokens(x, index), size=gather_tokens(size, index), index=index, assign=assign
    )


@register
class TokenCropr(TokenReducer):
    """One Cropr router pruning ``r`` tokens; ``dim`` is the token width."""

    catalog_id = "token_cropr"
    kind = "pruning"
    needs = frozenset()
    where = "pre"
    masks_attention = False  # the training mask is 1 in value: a gradient path only

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"dim": 32, "r": 0},
        "some": {"dim": 32, "r": 5},
    }

    def __init__(
        self,
        dim: int,
        r: int = 0,
        num_queries: int = 1,
        num_heads: int = 1,
        num_classes: int = 0,
        mlp_ratio: float = 4.0,
        fuse_last: bool = False,
        score_order: bool = True,
    ):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        self.r, self.num_heads, self.fuse_last = r, num_heads, fuse_last
        self.score_order = score_order
        self.scale = (dim // num_heads) ** -0.5
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        # The aggregation path exists only to train the router (the auxiliary head).
        self.head = None
        if num_classes > 0:
            self.proj = nn.Linear(dim, dim) if num_heads > 1 else nn.Identity()
            self.mlp_norm = nn.LayerNorm(dim, eps=1e-6)
            hidden = int(dim * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        kept = n - max(0, min(self.r, n - prefix))
        return kept, kept

    def aux_logits(self, x: Tensor, logits: Tensor) -> Tensor:
        """Auxiliary head on the queries' cross-attention output; ``logits [B, H, M, N]``."""
        b, n, c = x.shape
        attn = (logits * self.scale).softmax(dim=-1)
        v = x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # [B, H, N, D]
        agg = (attn @ v).transpose(1, 2).reshape(b, -1, c)  # [B, M, C]
        agg = self.proj(agg)
        agg = agg + self.mlp(self.mlp_norm(agg))
        return self.head(agg.mean(dim=1))  # [B, classes]

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        prefix = signals.prefix
        if not self.training:
            with torch.no_grad():
                scores = router_logits(x, self.queries.to(x.dtype), self.num_heads).sum((1, 2))
            out = cropr_prune(x, signals.size, scores, self.r, prefix, self.score_order)
        else:
            # Stop-gradient: the router never sends gradients into the backbone.
            logits = router_logits(x.detach(), self.queries.to(x.dtype), self.num_heads)
            scores = logits.sum((1, 2))  # [B, N]
            out = cropr_prune(x, signals.size, scores.detach(), self.r, prefix, self.score_order)
            if self.head is not None:
                signals.state.setdefault(AUX_KEY, []).append(self.aux_logits(x.detach(), logits))
            weights = (scores.float() * self.scale).softmax(dim=-1).gather(1, out.index)
            out.mask = (1 + (weights - weights.detach())).to(x.dtype)  # exactly 1, ST grad
        if self.fuse_last and out.num_tokens < x.shape[1]:
            dropped = out.assign[:, prefix:] < 0  # [B, N - prefix]
            # Dropped tokens first (stable), best first as the official ``x_p`` or in order.
            order = torch.arange(dropped.shape[1], device=x.device).expand_as(dropped)
            if self.score_order:
                order = scores[:, prefix:].detach().argsort(dim=1, descending=True)
            first = (
                dropped.gather(1, order).to(torch.int8).argsort(dim=1, descending=True, stable=True)
            )
            order = order.gather(1, first)
            idx = order[:, : x.shape[1] - out.num_tokens] + prefix  # [B, r]
            stash = signals.state.setdefault(PRUNED_KEY, [])
            stash.append((gather_tokens(x, idx), gather_tokens(signals.size, idx)))
        return out


class LastLayerFusion(TokenReducer):
    """LLF: put every token pruned in this forward back in front of the last block.

    Not registered: it adds tokens, so the shared contract does not apply to it.
    """

    kind = "token-recovery"
    where = "pre"

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        stash = signals.state.pop(PRUNED_KEY, [])
        b, n, _ = x.shape
        xs = torch.cat([x] + [t for t, _ in stash], dim=1)  # [B, N + pruned, C]
        sizes = torch.cat([signals.size] + [s for _, s in stash], dim=1)
        ar = torch.arange(n, device=x.device).expand(b, n)
        index = torch.cat([ar, ar.new_full((b, xs.shape[1] - n), -1)], dim=1)
        return Reduction(x=xs, size=sizes, index=index, assign=ar)


def cropr_reducers(
    depth: int, dim: int, r: int, llf: bool = False, **kwargs
) -> dict[int, TokenReducer]:
    """The official placement for ``vit.apply``: a router after every block but the last
    (with LLF: but the last two, and the fusion in front of the last block)."""
    last_router = depth - 2 if llf else depth - 1
    reducers: dict[int, TokenReducer] = {
        layer: TokenCropr(dim, r, fuse_last=llf, **kwargs) for layer in range(1, last_router + 1)
    }
    if llf:
        reducers[depth - 1] = LastLayerFusion()
    return reducers
