"""Vote&Mix (VoMix): training-free token reduction by similarity voting and soft mixing.

Paper: "Vote&Mix: Plug-and-Play Token Reduction for Efficient Vision Transformer",
https://arxiv.org/abs/2408.17062
Official code: none published (the catalog entry has no code link).

Algorithm (Sec. 3, as implemented here):
1. Vote: score every image token by the cosine similarity of the head-averaged
   attention keys; each token votes for its ``votes`` most similar other tokens,
   a vote weighing as much as that similarity.
2. The ``floor(ratio * N)`` tokens with the highest vote totals are the most
   homogeneous (many tokens look like them): they are selected to be mixed away.
3. Mix: every selected token is spread over the retained tokens with weights
   ``softmax(sim / tau)`` over the retained set, and each retained token becomes
   the size-weighted average of itself and what it received (sizes add up, so
   the host's proportional attention counts the mixed-in mass).

Deviations from the official code:
- There is no official code, and the stored copy of the paper available when
  this was written held its abstract only. Steps 1-3 are this module's reading
  of the abstract ("layer-wise token similarity voting", selected tokens "mixed
  into the retained set", per-layer reduction by a ratio ``r``, cost
  ``O(N^2 D (1/H + r(1-r)))``, i.e. an ``N x N`` similarity on ``D/H``-wide
  keys plus an ``rN x (1-r)N`` mixing of ``D``-wide tokens). The vote weighting
  (similarity-weighted top-``votes``), ``votes = 1`` and ``tau = 0.1`` are this
  module's choices, not values checked against the paper; verify them before
  reporting numbers.
- Hook: ``"mid"`` (after attention, before the MLP, where ToMe merges), reading
  the host's ``keys`` signal as the similarity metric.
- Ties in the vote are broken by token order (stable sort).
- All ``prefix`` tokens are protected: they neither vote, nor get votes, nor
  receive mixed tokens. Retained tokens keep their spatial order.
- ``Reduction.assign`` points a mixed token at the retained token that got the
  largest share of it; the mixing itself is soft.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, gather_tokens, identity
from reference.registry import register


def vote(metric: Tensor, votes: int = 1) -> tuple[Tensor, Tensor]:
    """Similarity votes among the image tokens of ``metric [B, M, D]``.

    Returns the vote totals ``[B, M]`` and the cosine similarities ``[B, M, M]``.
    """
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        sim = m @ m.transpose(-1, -2)  # [B, M, M]
        eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
        ballot = sim.masked_fill(eye, -torch.inf).topk(votes, dim=-1)  # a token votes for others
        scores = torch.zeros_like(sim[..., 0]).scatter_add(
            1, ballot.indices.flatten(1), ballot.values.flatten(1)
        )
    return scores, sim


def vote_and_mix(
    x: Tensor,
    size: Tensor,
    metric: Tensor,
    prefix: int,
    num_mix: int,
    votes: int = 1,
    tau: float = 0.1,
) -> Reduction:
    """Mix the ``num_mix`` most-voted image tokens of ``x [B, N, C]`` into the others."""
    b, n, _ = x.shape
    m = n - prefix
    num_mix = min(num_mix, m - 1)
    if num_mix <= 0:
        return identity(x, size)
    scores, sim = vote(metric[:, prefix:], min(votes, m - 1))
    order = scores.argsort(dim=1, descending=True, stable=True)
    mixed = order[:, :num_mix]  # [B, s] selected, into the image tokens
    kept = order[:, num_mix:].sort(dim=1).values  # [B, K] retained, spatial order
    with torch.no_grad():
        cross = sim.gather(1, mixed[..., None].expand(-1, -1, m)).gather(
            2, kept[:, None].expand(-1, num_mix, -1)
        )  # [B, s, K]
        weights = (cross / tau).softmax(dim=-1).to(x.dtype)  # each mixed token sums to 1

    x_img, s_img = x[:, prefix:], size[:, prefix:]
    s_kept = gather_tokens(s_img, kept)
    s_mixed = gather_tokens(s_img, mixed)
    new_size = s_kept + weights.transpose(1, 2) @ s_mixed  # [B, K, 1]
    mass = gather_tokens(x_img * s_img, kept) + weights.transpose(1, 2) @ gather_tokens(
        x_img * s_img, mixed
    )  # [B, K, C]
    out = torch.cat([x[:, :prefix], mass / new_size], dim=1)
    out_size = torch.cat([size[:, :prefix], new_size], dim=1)

    pre = torch.arange(prefix, device=x.device).expand(b, prefix)
    index = torch.cat([pre, prefix + kept], dim=1)  # [B, prefix + K]
    assign = torch.empty(b, n, dtype=torch.long, device=x.device)
    assign.scatter_(1, index, torch.arange(index.shape[1], device=x.device).expand(b, -1))
    assign.scatter_(1, prefix + mixed, prefix + weights.argmax(dim=-1))
    return Reduction(x=out, size=out_size, index=index, assign=assign)


@register
class VoteAndMix(TokenReducer):
    """Mix ``floor(ratio * image tokens)`` homogeneous tokens away per block."""

    catalog_id = "vote_and_mix"
    basis = "abstract only (no official code; paper text unavailable)"
    kind = "merging"
    needs = frozenset({"keys"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {"zero": {"ratio": 0.0}, "some": {"ratio": 0.25}}

    def __init__(self, ratio: float = 0.0, votes: int = 1, tau: float = 0.1):
        super().__init__()
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if votes < 1:
            raise ValueError(f"votes must be >= 1, got {votes}")
        self.ratio, self.votes, self.tau = ratio, votes, tau

    def num_mix(self, n: int, prefix: int) -> int:
        return max(0, min(math.floor(self.ratio * (n - prefix)), n - prefix - 1))

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        kept = n - self.num_mix(n, prefix)
        return kept, kept

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        return vote_and_mix(
            x,
            signals.size,
            signals.keys,
            signals.prefix,
            self.num_mix(x.shape[1], signals.prefix),
            self.votes,
            self.tau,
        )
