"""TokenPacker: point-to-region attention from downsampled queries into multi-level features.

Paper: "TokenPacker: Efficient Visual Projector for Multimodal LLM",
https://arxiv.org/abs/2407.02392
Official code: https://github.com/CircleRadon/TokenPacker,
``llava/model/multimodal_projector/builder.py``, class ``TokenPacker`` (multi-level features
from ``llava/model/multimodal_encoder/clip_encoder.py``, ``CLIPVisionTower.feature_select``).

Algorithm (Sec. 3.2, Fig. 3):
1. Point queries: bilinearly downsample the selected layer's ``raw_grid x raw_grid`` patch
   grid by ``scale_factor`` (576 patches to 144 in the main setting), then project them.
2. Region keys and values: concatenate the patch features of several CLIP layers along the
   channels (hidden_states 12, 16, 22, 23 of ViT-L) and map them with two-layer MLPs.
3. Point-to-region attention: each query attends only to the ``scale_factor**2`` keys of its
   own region of the full-resolution grid (one multi-head attention, regions as the batch).
4. A two-layer MLP maps the packed queries to the LLM's width.

Inputs: ``features`` is the selected layer's patch tokens; the levels come from
``signals.layers`` (``layers[i]`` is block ``i``'s output, CLS first), numbered as Hugging
Face's ``hidden_states``: level ``l`` is ``signals.layers[l - 1]``. Parameter names are the
official ones (``q_proj_1``, ``k_proj_1.0``, ``ln_q_1``, ``clip_attn.in_proj_weight``,
``mlp.2``, ...): a released ``mm_projector.bin`` loads after stripping its
``model.mm_projector.`` prefix.

Deviations from the official code:
- The official module hard-codes the widths 4096 (four 1024-wide levels) and 1024 in
  ``k_proj_1``, ``v_proj_1`` and ``mlp``; here they are ``len(multi_layers) * in_dim`` and
  ``embed_dim``, equal at the defaults. The official ``kv_dim`` is ``in_dim`` and
  ``hidden_size`` is ``out_dim``. The levels are an argument (``multi_layers``), the official
  ``feature_select`` default being fixed.
- Regions are gathered with one reshape, not ``divide_feature``'s chain; the keys of a region
  come in another order, which attention (no positions) does not see.
- ``scale_factor`` 1 (the official code accepts it: as many tokens out as in) is a
  ValueError: it is not a reduction.
- The official ``attn_mask`` argument (never passed in the official code) is left out;
  the TokenPacker-HD dynamic-resolution path (image crops) is not here.
"""

from __future__ import annotations

import math
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


def mlp2(cin: int, cout: int) -> nn.Sequential:
    """Linear, GELU, Linear (the official k, v and output MLPs)."""
    return nn.Sequential(nn.Linear(cin, cout), nn.GELU(), nn.Linear(cout, cout))


def regions(x: Tensor, grid: int, s: int) -> Tensor:
    """``[B, grid * grid, C]`` -> ``[s * s, B * (grid // s) ** 2, C]``: each ``s x s`` region's
    tokens as one sequence, regions (row-major, per sample) as the batch."""
    b, _, c = x.shape
    g = grid // s
    x = x.reshape(b, g, s, g, s, c).permute(2, 4, 0, 1, 3, 5)  # [s, s, B, g, g, C]
    return x.reshape(s * s, b * g * g, c)


@register
class TokenPacker(Projector):
    """Downsampled point queries attend to their own region of multi-level features."""

    catalog_id = "tokenpacker"
    kind = "convolutional-downsampling"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {
            "in_dim": 32,
            "out_dim": 64,
            "raw_grid": 4,
            "scale_factor": 2,
            "embed_dim": 32,
            "num_heads": 4,
            "multi_layers": (1, 2),
        },
    }
    invalid_configs = (
        ({"scale_factor": 3}, "scale_factor"),
        ({"scale_factor": 1}, "scale_factor"),
        ({"num_heads": 5}, "num_heads"),
        ({"multi_layers": ()}, "multi_layers"),
        ({"multi_layers": (0, 2)}, "multi_layers"),
    )

    @classmethod
    def count_setting(cls, keep: int, n_image: int) -> dict | None:
        raw, side = math.isqrt(n_image), math.isqrt(keep)
        if raw * raw != n_image or side * side != keep or side == 0 or raw % side:
            return None
        return {"raw_grid": raw, "scale_factor": raw // side}

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        raw_grid: int = 24,
        scale_factor: int = 2,
        embed_dim: int = 1024,
        num_heads: int = 1024 // 128,
        multi_layers: tuple[int, ...] = (12, 16, 22, 23),
    ):
        """Defaults: LLaVA-1.5-7B with TokenPacker (CLIP ViT-L/14 at 336 px, 24 x 24 patches
        of width 1024, Vicuna-7B: 4096, ``scale_factor`` 2: 144 tokens)."""
        super().__init__()
        if scale_factor < 2 or raw_grid % scale_factor:
            raise ValueError(
                f"scale_factor must be >= 2 and divide raw_grid ({raw_grid}), got {scale_factor}"
            )
        if embed_dim % num_heads:
            raise ValueError(
                f"num_heads must be a divisor of embed_dim ({embed_dim}), got {num_heads}"
            )
        if not multi_layers or min(multi_layers) < 1:
            raise ValueError(
                f"multi_layers must be a non-empty list of block numbers >= 1, got {multi_layers}"
            )
        self.raw_grid, self.scale_factor = raw_grid, scale_factor
        self.grid_size = raw_grid // scale_factor
        self.num_queries = self.grid_size**2
        self.multi_layers = tuple(multi_layers)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.q_proj_1 = nn.Linear(in_dim, embed_dim, bias=False)
        self.k_proj_1 = mlp2(len(multi_layers) * in_dim, embed_dim)
        self.v_proj_1 = mlp2(len(multi_layers) * in_dim, embed_dim)
        self.ln_q_1, self.ln_k_1, self.ln_v_1 = norm(embed_dim), norm(embed_dim), norm(embed_dim)
        self.clip_attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )
        for m in self.modules():  # the official _init_weights (MultiheadAttention keeps its own)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def num_tokens(self, n: int) -> int:
        return self.num_queries

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        """``[B, raw_grid ** 2, in_dim]`` -> ``[B, (raw_grid // scale_factor) ** 2, out_dim]``."""
        b, n, c = features.shape
        if n != self.raw_grid**2:
            raise ValueError(f"got {n} patch tokens; this TokenPacker takes {self.raw_grid}**2")
        if len(signals.layers) < max(self.multi_layers):
            raise ValueError(
                f"multi_layers {self.multi_layers} need {max(self.multi_layers)} vision layers "
                f"in signals.layers, got {len(signals.layers)}"
            )
        multi = torch.cat([signals.layers[i - 1][:, 1:] for i in self.multi_layers], dim=-1)
        key = self.ln_k_1(self.k_proj_1(multi))  # [B, N, E]
        value = self.ln_v_1(self.v_proj_1(multi))
        # Point queries: bilinear downsampling of the selected layer (in fp32, as official).
        grid = features.float().transpose(1, 2).reshape(b, c, self.raw_grid, self.raw_grid)
        q = F.interpolate(grid, size=(self.grid_size,) * 2, mode="bilinear")
        q = q.flatten(2).transpose(1, 2).to(features.dtype)  # [B, M, C]
        query = self.ln_q_1(self.q_proj_1(q)).reshape(1, b * self.num_queries, -1)
        s = self.scale_factor
        out = self.clip_attn(
            query,
            regions(key, self.raw_grid, s),
            regions(value, self.raw_grid, s),
            need_weights=False,
        )[0]  # [1, B * M, E]
        return self.mlp(out.reshape(b, self.num_queries, -1))
