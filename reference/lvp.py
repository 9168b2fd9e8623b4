"""LVP: a language-guided visual projector (text-similarity selection, then deformable attention).

Paper: "LVP: Language-guide Visual Projector for Efficient Multimodal LLM",
https://openreview.net/forum?id=PxBzxO02Ef (an ICLR 2025 submission; no arXiv version)
Official code: none released ("The code and the model will be released").

PROVISIONAL: written from the paper's abstract, the only text of it that could be read here
(the OpenReview PDF and supplementary zip were not available). Everything below the level of
the abstract's sentences is a guess; see the list.

Algorithm (abstract):
1. A lightweight text encoder gives the instruction's features (here the caller's, in
   ``signals.state["text"]``), mapped to the vision width.
2. A lightweight cross-modal enhancement aligns the visual tokens with the text.
3. The ``num_queries`` visual tokens most similar to the text are kept.
4. Deformable attention integrates the vision encoder's features, from one or several of its
   stages (the multi-level LVP), into the kept tokens; an MLP maps them to the LLM width.

Guessed (none of this is in the abstract):
- The text encoder is outside the module; ``text_proj`` (a linear map) aligns its width.
- Enhancement: one pre-norm cross-attention from the visual tokens to the text tokens and a
  GELU MLP, both residual (Grounding-DINO-like, one direction only).
- Similarity: cosine, the maximum over text tokens (language-guided query selection as in
  Grounding DINO); the kept tokens stay in raster order. No text: the mean visual token guides.
- Deformable attention: Deformable DETR's ``MSDeformAttn`` (parameter names ``sampling_offsets``,
  ``attention_weights``, ``value_proj``, ``output_proj``; 8 heads, 4 points), reference point
  the kept token's own cell, offsets in cells; levels = ``signals.layers[i]`` for ``levels``
  (default: the selected layer only); residual plus LayerNorm, then LLaVA's 2-layer MLP.
- Defaults: 576 -> 144 tokens (the abstract's 75% end); CLIP-L (1024) to a 4096-wide LLM.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


@torch.no_grad()
def text_similarity(visual: Tensor, text: Tensor) -> Tensor:
    """Each visual token's highest cosine similarity to a text token: ``[B, N]``."""
    sim = F.normalize(visual.float(), dim=-1) @ F.normalize(text.float(), dim=-1).transpose(1, 2)
    return sim.amax(dim=-1)


def deformable_sample(
    values: list[Tensor], grids: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """Multi-scale deformable sampling (Deformable DETR's ``ms_deform_attn_core_pytorch``).

    Args:
        values: per level ``[B, h_l * w_l, H, D]``.
        grids: per level ``(h_l, w_l)``.
        locations: ``[B, Q, H, L, P, 2]`` as ``(x, y)`` in ``[0, 1]``.
        weights: ``[B, Q, H, L, P]``, softmax-normalised over ``L * P``.

    Returns:
        ``[B, Q, H * D]``.
    """
    b, q, heads, _, points, _ = locations.shape
    sampled = []
    for lvl, (value, (h, w)) in enumerate(zip(values, grids, strict=True)):
        v = value.permute(0, 2, 3, 1).reshape(b * heads, -1, h, w).float()  # [B H, D, h, w]
        grid = 2 * locations[:, :, :, lvl].transpose(1, 2).reshape(b * heads, q, points, 2) - 1
        sampled.append(F.grid_sample(v, grid.float(), align_corners=False))  # [B H, D, Q, P]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [B H, D, Q, L P]
    w = weights.transpose(1, 2).reshape(b * heads, 1, q, -1).float()
    out = (stacked * w).sum(-1).view(b, heads, -1, q)  # [B, H, D, Q]
    return out.permute(0, 3, 1, 2).reshape(b, q, -1).to(values[0].dtype)


class MSDeformAttn(nn.Module):
    """Deformable attention of ``heads x levels x points`` samples around each query's cell."""

    def __init__(self, dim: int, levels: int, heads: int, points: int):
        super().__init__()
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.sampling_offsets.weight)  # Deformable DETR: start on a ring of points
        angle = torch.arange(heads) * (2 * torch.pi / heads)
        ring = torch.stack([angle.cos(), angle.sin()], -1)
        ring = ring / ring.abs().amax(-1, keepdim=True)
        ring = ring[:, None, None].repeat(1, levels, points, 1) * torch.arange(1, points + 1)[
            :, None
        ].to(ring)
        self.sampling_offsets.bias.data.copy_(ring.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(
        self, query: Tensor, reference: Tensor, levels: list[Tensor], grids: list[tuple[int, int]]
    ) -> Tensor:
        """``query [B, Q, C]``, ``reference [B, Q, 2]`` (x, y) in ``[0, 1]``, levels
        ``[B, N_l, C]`` on ``grids`` -> ``[B, Q, C]``."""
        b, q, _ = query.shape
        shape = (b, q, self.heads, self.levels, self.points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        norm = torch.tensor([[w, h] for h, w in grids], dtype=query.dtype, device=query.device)
        locations = reference[:, :, None, None, None] + offsets / norm[:, None]  # cells to [0, 1]
        weights = self.attention_weights(query).view(b, q, self.heads, -1).softmax(-1)
        values = [self.value_proj(x).view(b, x.shape[1], self.heads, -1) for x in levels]
        out = deformable_sample(values, grids, locations, weights.view(shape))
        return self.output_proj(out)


class CrossModalEnhancer(nn.Module):
    """Visual tokens attend to the text tokens, then a GELU MLP (both pre-norm, residual)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_v, self.norm_t, self.norm_ffn = (
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
        )
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, visual: Tensor, text: Tensor) -> Tensor:
        t = self.norm_t(text)
        visual = visual + self.cross_attn(self.norm_v(visual), t, t, need_weights=False)[0]
        return visual + self.ffn(self.norm_ffn(visual))


@register
class LVP(Projector):
    """Text-guided selection of ``num_queries`` visual tokens, deformable attention, an MLP."""

    catalog_id = "lvp"
    kind = "pruning"
    basis = (
        "provisional: the paper's abstract (OpenReview PxBzxO02Ef) only; no code was released "
        "and the paper's body was not available, so every design detail is guessed"
    )
    count_argument = "num_queries"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "num_queries": 4, "num_heads": 4, "n_points": 2},
    }
    invalid_configs = (
        ({"num_queries": 0}, "num_queries"),
        ({"num_heads": 5}, "num_heads"),
        ({"n_points": 0}, "n_points"),
        ({"levels": ()}, "levels"),
    )

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        num_queries: int = 144,
        text_dim: int | None = None,
        levels: tuple[int, ...] | None = None,
        num_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        if num_heads < 1 or in_dim % num_heads:
            raise ValueError(f"num_heads must be >= 1 and divide in_dim={in_dim}, got {num_heads}")
        if n_points < 1:
            raise ValueError(f"n_points must be >= 1, got {n_points}")
        if levels is not None and not levels:
            raise ValueError("levels must be None or name at least one vision layer")
        self.num_queries, self.levels = num_queries, levels
        self.text_proj = nn.Linear(text_dim or in_dim, in_dim)
        self.enhancer = CrossModalEnhancer(in_dim, num_heads)
        self.deform_attn = MSDeformAttn(in_dim, len(levels or (-1,)), num_heads, n_points)
        self.norm = nn.LayerNorm(in_dim)
        self.mm_projector = nn.Sequential(
            nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )

    def num_tokens(self, n: int) -> int:
        return self.num_queries

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        n, c = features.shape[1:]
        h, w = signals.grid if signals.grid[0] * signals.grid[1] == n else (int(n**0.5),) * 2
        if h * w != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        if self.num_queries > n:
            raise ValueError(f"num_queries must be <= the {n} patch tokens, got {self.num_queries}")
        text = signals.state.get("text")
        text = features.mean(1, keepdim=True) if text is None else self.text_proj(text)
        enhanced = self.enhancer(features, text.to(features.dtype))
        keep = text_similarity(enhanced, text).topk(self.num_queries, dim=1).indices.sort(1).values
        query = enhanced.gather(1, keep[..., None].expand(-1, -1, c))  # [B, Q, C]
        cells = torch.stack([keep % w, keep // w], -1).to(features.dtype)
        reference = (cells + 0.5) / torch.tensor([w, h], dtype=features.dtype, device=keep.device)
        if self.levels is None:
            levels = [features]
        else:
            levels = [signals.layers[i][:, -n:] for i in self.levels]  # drop the CLS token
        query = self.norm(
            query + self.deform_attn(query, reference, levels, [(h, w)] * len(levels))
        )
        signals.state["lvp"] = {"kept": keep}
        return self.mm_projector(query)
