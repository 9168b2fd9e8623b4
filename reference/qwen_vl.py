"""Qwen-VL: a single cross-attention layer with learned queries as the projector.

Paper: "Qwen-VL: A Versatile Vision-Language Model for Understanding, Localization,
Text Reading, and Beyond", https://arxiv.org/abs/2308.12966
Official code: https://huggingface.co/Qwen/Qwen-VL, ``visual.py``: ``Resampler`` (built as
``VisionTransformer.attn_pool``) followed by ``VisionTransformer``'s ``ln_post`` and ``proj``
(https://github.com/QwenLM/Qwen-VL holds no model code).

Algorithm (Sec. 2.1, "Position-aware Vision-Language Adapter"):
1. Project the patch features to the LLM width (``kv_proj``, no bias) and layer-normalise them.
2. ``n_queries`` learned queries (256, a 16x16 grid), layer-normalised, cross-attend to them in one
   multi-head attention; 2-D sin-cos positions are added to the queries (their own grid) and to
   the keys (the same table, bicubic-resized to the patch grid), not to the values.
3. LayerNorm, then a bias-free ``[out_dim, out_dim]`` matrix: 1024 patches (448 px) to 256 tokens.

Deviations from the official code:
- ``attn_pool.pos_embed`` is a persistent buffer here, a frozen ``nn.Parameter`` there: same
  state-dict key and values, but ``parameters()`` counts it there, not here (the test adds it).
- ``num_heads`` defaults to ``out_dim // 128`` as there; it is an argument so tiny widths run.
- The key positions are resized to ``signals.grid`` (the official code assumes a square grid of
  ``sqrt(N)`` per side; same result there); a non-square count without a grid is a ValueError.
- Weights: the checkpoint's ``transformer.visual.{attn_pool,ln_post,proj}*`` keys load with the
  ``transformer.visual.`` prefix removed.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> Tensor:
    """MAE's 2-D sin-cos table ``[h * w, dim]``, row-major: the first half encodes the column,
    the second half the row, each as ``[sin(p * omega), cos(p * omega)]`` (float32 as there)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )

    def one(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega  # [h * w, dim / 4]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1)


def resize_pos_embed(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """A square ``[L, C]`` table bicubic-resized to ``grid`` (``[h * w, C]``), as Qwen-VL's
    ``get_abs_pos``; returned unchanged when it already has that size."""
    side = math.isqrt(pos.shape[0])
    if (side, side) == tuple(grid):
        return pos
    table = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    out = F.interpolate(table, size=tuple(grid), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


class Resampler(nn.Module):
    """One cross-attention of ``grid_size**2`` learned queries over the patch features
    (official names: ``query``, ``pos_embed``, ``kv_proj``, ``attn``, ``ln_q``, ``ln_kv``)."""

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, kv_dim: int):
        super().__init__()
        self.num_queries = grid_size**2
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid_size, grid_size))
        self.query = nn.Parameter(
            nn.init.trunc_normal_(torch.zeros(self.num_queries, embed_dim), std=0.02)
        )
        self.kv_proj = (
            nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        )
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        for m in self.modules():  # the official ``_init_weights``
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, N, kv_dim]`` patch features on ``grid`` -> ``[B, Q, embed_dim]``."""
        key_pos = resize_pos_embed(self.pos_embed, grid).to(x.dtype)  # [N, E]
        x = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed.to(x.dtype)).expand(x.shape[0], -1, -1)
        return self.attn(q, x + key_pos, x, need_weights=False)[0]


@register
class QwenVL(Projector):
    """Qwen-VL's adapter: ``attn_pool`` (a one-layer resampler), ``ln_post``, then ``@ proj``."""

    catalog_id = "qwen_vl"
    kind = "resampling"
    count_argument = "n_queries"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "n_queries": 4, "num_heads": 4},
    }
    invalid_configs = (
        ({"n_queries": 10}, "n_queries"),
        ({"n_queries": 0}, "n_queries"),
        ({"num_heads": 3}, "num_heads"),
        ({"out_dim": 66, "num_heads": 2}, "out_dim"),
    )

    def __init__(
        self,
        in_dim: int = 1664,
        out_dim: int = 4096,
        n_queries: int = 256,
        num_heads: int | None = None,
    ):
        super().__init__()
        side = math.isqrt(n_queries) if n_queries > 0 else 0
        if side < 1 or side * side != n_queries:
            raise ValueError(f"n_queries must be a positive square (a query grid), got {n_queries}")
        num_heads = out_dim // 128 if num_heads is None else num_heads
        if num_heads < 1 or out_dim % num_heads:
            raise ValueError(
                f"num_heads must be >= 1 and divide out_dim={out_dim}, got {num_heads}"
            )
        if out_dim % 4:
            raise ValueError(
                f"out_dim must be a multiple of 4 (2-D sin-cos positions), got {out_dim}"
            )
        self.n_queries = n_queries
        self.attn_pool = Resampler(side, out_dim, num_heads, kv_dim=in_dim)
        self.ln_post = nn.LayerNorm(out_dim, eps=1e-6)
        self.proj = nn.Parameter(out_dim**-0.5 * torch.randn(out_dim, out_dim))

    def num_tokens(self, n: int) -> int:
        return self.n_queries

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        n = features.shape[1]
        grid = signals.grid if signals.grid[0] * signals.grid[1] == n else (math.isqrt(n),) * 2
        if grid[0] * grid[1] != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        return self.ln_post(self.attn_pool(features, grid)) @ self.proj
