"""LDPv2 (MobileVLM V2): MLP, 2-D average pooling of the grid, then a conv positional layer.

Paper: "MobileVLM V2: Faster and Stronger Baseline for Vision Language Model",
https://arxiv.org/abs/2402.03766
Official code: https://github.com/Meituan-AutoML/MobileVLM,
``mobilevlm/model/vision_projector.py``, ``LDPNetV2Projector`` (with its
``FeatureIRLayer``, ``TokenDownLayer`` and ``PosInjectLayer``).

Algorithm (Sec. 3.3, LDPv2):
1. Feature transformation: map every CLIP patch feature to the LLM width with a
   two-layer MLP (Linear, GELU, Linear), token by token.
2. Token reduction: lay the tokens out on their grid and shrink it with a 2-D adaptive
   average pooling to ``shape x shape`` (24x24 = 576 -> 12x12 = 144 in the paper).
3. Positional information enhancement (PEG, from Twins): add a 3x3 depthwise
   convolution of the pooled grid to itself, a skip-connected conditional position code.

Deviations from the official code:
- The pooled side is the argument ``shape`` (default 12, the value the official
  ``LDPNetV2Projector`` hard-codes as ``TokenDownLayer((12, 12))``); it is one side because
  the official ``PosInjectLayer`` needs a square pooled grid.
- The input grid comes from ``signals.grid`` where the host gives it, else the square
  root of the token count (the official ``TokenDownLayer`` asserts a square); a grid
  smaller than ``shape`` is refused, where the official adaptive pooling would silently
  upsample it to more tokens than came in.
- Parameter names follow the official nesting (``mlp.mlp.0``, ``mlp.mlp.2``,
  ``peg.peg.0``; the pooling has none), so a released checkpoint's
  ``model.mm_projector.*`` keys load once that prefix is stripped.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


def pool_grid(x: Tensor, grid: tuple[int, int], shape: int) -> Tensor:
    """Adaptive 2-D average pooling of a token grid.

    Args:
        x: tokens ``[B, N, C]`` in row-major grid order, ``N = h * w``.
        grid: ``(h, w)``.
        shape: side of the pooled grid.

    Returns:
        ``[B, shape * shape, C]``, row-major.
    """
    b, _, c = x.shape
    cells = x.transpose(1, 2).reshape(b, c, *grid)  # b c h w
    return F.adaptive_avg_pool2d(cells, shape).flatten(2).transpose(1, 2)


@register
class MobileVLMV2(Projector):
    """LDPv2: MLP, adaptive average pooling to ``shape x shape``, depthwise-conv PEG."""

    catalog_id = "mobilevlm_v2"
    kind = "pooling"
    test_configs: ClassVar[dict[str, dict]] = {"some": {"in_dim": 32, "out_dim": 64, "shape": 2}}
    invalid_configs = (({"shape": 0}, "shape"),)

    @classmethod
    def count_setting(cls, keep: int, n_image: int) -> dict | None:
        side = math.isqrt(keep)
        return {"shape": side} if side * side == keep else None

    def __init__(self, in_dim: int = 1024, out_dim: int = 2048, shape: int = 12):
        super().__init__()
        if shape < 1:
            raise ValueError(f"shape must be a positive side of the pooled grid, got {shape}")
        self.shape = shape
        self.mlp = nn.ModuleDict(
            {
                "mlp": nn.Sequential(
                    nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
                )
            }
        )
        self.peg = nn.ModuleDict(
            {"peg": nn.Sequential(nn.Conv2d(out_dim, out_dim, 3, 1, 1, groups=out_dim))}
        )

    def num_tokens(self, n: int) -> int:
        return self.shape * self.shape

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        b, n, _ = features.shape
        h, w = signals.grid if signals.grid[0] * signals.grid[1] == n else (math.isqrt(n),) * 2
        if h * w != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        if h < self.shape or w < self.shape:
            raise ValueError(f"a {h}x{w} grid cannot be pooled to shape={self.shape}")
        x = pool_grid(self.mlp["mlp"](features), (h, w), self.shape)  # [B, s*s, D]
        cells = x.transpose(1, 2).reshape(b, -1, self.shape, self.shape)
        cells = self.peg["peg"](cells) + cells  # PEG: position code conditioned on the content
        return cells.flatten(2).transpose(1, 2)
