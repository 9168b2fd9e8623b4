"""HiRes-LLaVA: the Self-Mining Sampler, a projector whose queries come from the tokens themselves.

Paper: "HiRes-LLaVA: Restoring Fragmentation Input in High-Resolution Large Vision-Language
Models", https://arxiv.org/abs/2407.08706 (CVPR 2025)
Official code: none found (the catalog entry has no code link; no repository was found).

PROVISIONAL: written from the paper's abstract and the catalog summary ("a Self-Mining Sampler
that condenses each slice's visual tokens from their own content while keeping their positional
layout") and from two third-party summaries of the paper (a themoonlight.io review and a
CSDN post) that describe the SliceRestore adapter and say the sampler replaces the Q-Former's
fixed queries, which lose position; the paper's own description of the sampler was not read.

Algorithm (as guessed):
1. Average-pool each slice's ``N = h * w`` patch features on their grid to ``num_queries``
   cells (576 -> 144): the queries, each sitting where its region is, so no learned query and
   no position is lost.
2. One pre-norm cross-attention of the queries over all of the slice's patch features
   (multi-head, residual), then a residual GELU MLP: the sampler "mines" the slice for detail.
3. LLaVA's two-layer MLP projector maps the condensed tokens to the LLM width.

Guessed (not read anywhere): the pooling (adaptive average, to a square grid), one layer, the
pre-norm residual layout, 8 heads, a 4x MLP, the output count 144 and that the LLM projector
comes after the sampler; the widths are LLaVA-1.5's (CLIP-L 1024 -> 4096). Out of scope: the
SliceRestore adapter, which acts inside the vision encoder (across slices), not in the
projector; each slice is one image of the batch here.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


def pooled_queries(x: Tensor, grid: tuple[int, int], side: int) -> Tensor:
    """``[B, h * w, C]`` row-major tokens average-pooled to ``[B, side * side, C]``."""
    b, _, c = x.shape
    cells = x.transpose(1, 2).reshape(b, c, *grid)
    return F.adaptive_avg_pool2d(cells, side).flatten(2).transpose(1, 2)


class SelfMiningSampler(nn.Module):
    """Pooled queries cross-attend to the tokens they were pooled from, then an MLP."""

    def __init__(self, dim: int, side: int, heads: int):
        super().__init__()
        self.side = side
        self.ln_q, self.ln_kv, self.ln_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        q = pooled_queries(x, grid, self.side)
        kv = self.ln_kv(x)
        q = q + self.attn(self.ln_q(q), kv, kv, need_weights=False)[0]
        return q + self.ffn(self.ln_ffn(q))


@register
class HiResLLaVA(Projector):
    """The Self-Mining Sampler (``sampler``), then LLaVA's MLP projector (``mm_projector``)."""

    catalog_id = "hires_llava"
    kind = "resampling"
    basis = (
        "provisional: the abstract, the catalog summary and two third-party summaries of the "
        "paper; no official code exists and the sampler's design is guessed"
    )
    count_argument = "num_queries"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "num_queries": 4, "num_heads": 4},
    }
    invalid_configs = (
        ({"num_queries": 10}, "num_queries"),
        ({"num_queries": 0}, "num_queries"),
        ({"num_heads": 5}, "num_heads"),
    )

    def __init__(
        self, in_dim: int = 1024, out_dim: int = 4096, num_queries: int = 144, num_heads: int = 8
    ):
        super().__init__()
        side = math.isqrt(num_queries) if num_queries > 0 else 0
        if side < 1 or side * side != num_queries:
            raise ValueError(f"num_queries must be a positive square (a grid), got {num_queries}")
        if num_heads < 1 or in_dim % num_heads:
            raise ValueError(f"num_heads must be >= 1 and divide in_dim={in_dim}, got {num_heads}")
        self.num_queries = num_queries
        self.sampler = SelfMiningSampler(in_dim, side, num_heads)
        self.mm_projector = nn.Sequential(
            nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )

    def num_tokens(self, n: int) -> int:
        return self.num_queries

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        n = features.shape[1]
        h, w = signals.grid if signals.grid[0] * signals.grid[1] == n else (math.isqrt(n),) * 2
        if h * w != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        if min(h, w) < self.sampler.side:
            raise ValueError(f"num_queries must fit the {h}x{w} grid, got {self.num_queries}")
        return self.mm_projector(self.sampler(features, (h, w)))
