"""DeCo: parameter-free adaptive average pooling as the projector's compressor.

Paper: "DeCo: Decoupling Token Compression from Semantic Abstraction in Multimodal
Large Language Models", https://arxiv.org/abs/2405.20985
Official code: https://github.com/yaolinli/DeCo (the repository holds only a
README; its ``AvgPoolProjector`` snippet is the reference followed here).

Algorithm (Sec. 3):
1. Lay the vision tower's ``N = h * w`` patch features out on their 2-D grid.
2. Shrink the grid with a 2-D adaptive average pooling to ``q = s * s`` cells
   (``query_num``; 576 patches to 144 in the paper's main setting): compression
   without learned queries, so semantics are abstracted only by the LLM.
3. Map each cell to the language model's width with LLaVA's MLP projector
   (``layer_num`` linear layers with GELU between them).

Deviations from the official code:
- Basis: no released code; this follows the README's snippet (parameter names
  ``mlp_projector.0``, ``mlp_projector.2``, … as there, so its weights load).
- The grid comes from ``signals.grid`` where the host gives it, else the square
  root of the token count, as the snippet takes; a non-square count without a grid
  is a ValueError. The snippet pools to ``int(sqrt(query_num))`` per side; here
  ``query_num`` must be a square, so the output count is what was asked for.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


@register
class DeCo(Projector):
    """Adaptive average pooling of the patch grid to ``query_num`` cells, then an MLP."""

    catalog_id = "deco"
    kind = "pooling"
    basis = "the authors' README snippet (the repository has no code files)"
    count_argument = "query_num"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "query_num": 4},
    }
    invalid_configs = (
        ({"query_num": 10}, "query_num"),
        ({"query_num": 0}, "query_num"),
        ({"layer_num": 0}, "layer_num"),
    )

    def __init__(
        self, in_dim: int = 1024, out_dim: int = 4096, query_num: int = 144, layer_num: int = 2
    ):
        super().__init__()
        side = math.isqrt(query_num) if query_num > 0 else 0
        if side < 1 or side * side != query_num:
            raise ValueError(f"query_num must be a positive square, got {query_num}")
        if layer_num < 1:
            raise ValueError(f"layer_num must be >= 1, got {layer_num}")
        self.query_num, self.side = query_num, side
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(1, layer_num):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.mlp_projector = nn.Sequential(*layers)

    def num_tokens(self, n: int) -> int:
        return self.query_num

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        b, n, c = features.shape
        h, w = signals.grid if signals.grid[0] * signals.grid[1] == n else (math.isqrt(n),) * 2
        if h * w != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        if h < self.side or w < self.side:
            raise ValueError(f"a {h}x{w} grid cannot be pooled to query_num={self.query_num}")
        grid = features.transpose(1, 2).reshape(b, c, h, w)
        pooled = F.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2)  # [B, q, C]
        return self.mlp_projector(pooled)
