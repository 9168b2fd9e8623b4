"""FocusLLaVA: coarse-to-fine visual token compression (vision-guided, then text-guided).

Paper: "FocusLLaVA: A Coarse-to-Fine Approach for Efficient and Effective Visual Token
Compression", https://arxiv.org/abs/2411.14228
Official code: none released (none in the catalog entry or the paper's stored pages).

PROVISIONAL: written from the paper's abstract (the stored copies of the arXiv HTML end
after the first paragraphs of the introduction). Everything below the abstract's sentences
is a guess; see the list.

Algorithm (abstract):
1. Vision-guided sampler, before the language model (``VisionGuidedSampler``, a
   ``Projector``): regions of low information density are compressed, at a scale that a
   learned module chooses per region; the others keep their fine tokens.
2. Text-guided sampler, inside the language model (``FocusLLaVA``, the registered
   ``LLMReducer``): at a middle decoder layer, only the image tokens most related to the
   user's instruction stay.
The two run together as ``LlavaHost.apply(projector=VisionGuidedSampler(...),
llm=FocusLLaVA.paper_placement(num_layers))``.

Guessed (none of this is in the abstract):
- Regions: ``region x region`` windows of the patch grid. The scale module
  (``scale_selector``: LayerNorm, Linear C_v -> 1) scores each region from its mean feature;
  the ``fine_regions`` best keep all their tokens, the others are average-pooled to one
  token (two scales), so the count is fixed per image (``fine * region^2 + rest``). The
  paper's choice may be free per region; a fixed budget keeps batches unpadded.
  Gradient: a straight-through weight ``1 + p - stop_grad(p)`` (``p`` the selector's
  sigmoid) on the fine tokens, ``1 + (1-p) - stop_grad(1-p)`` on the coarse ones.
- Tokens go out region by region in raster order, a fine region's tokens in raster order;
  both scales share LLaVA's 2-layer GELU MLP (``mm_projector``). Defaults: LLaVA-1.5
  (CLIP-L 1024 -> 4096, 24 x 24 patches), 4 x 4 regions, 18 of 36 fine: 306 tokens.
- Text-guided sampler: relevance of an image token is the attention it receives from the
  valid instruction tokens after the image (this layer's maps, averaged over heads and
  queries); the top ``1 - ratio`` stay in order; nothing is learned. Placement: after
  decoder layer ``num_layers // 2 - 1`` (so the middle layer is the first to see fewer
  tokens); ``ratio`` 0.5.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.core import Reduction
from reference.hosts.llava import LLMReducer, LLMSignals
from reference.ops import keep_image_tokens
from reference.projector import Projector, ProjectorSignals
from reference.registry import register


def regions_of(x: Tensor, grid: tuple[int, int], region: int) -> Tensor:
    """``x [B, h*w, C]`` -> ``[B, R, region^2, C]``: windows in raster order."""
    b, _, c = x.shape
    h, w = grid
    x = x.view(b, h // region, region, w // region, region, c)  # 'b (y i) (x j) c'
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, region * region, c)


class VisionGuidedSampler(Projector):
    """The coarse step: informative regions keep their tokens, the others become one."""

    catalog_id = "focusllava"
    kind = "pooling"
    basis = "paper (provisional)"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "region": 2, "fine_regions": 1}
    }
    invalid_configs = (({"region": 0}, "region"), ({"fine_regions": -1}, "fine_regions"))

    def __init__(
        self, in_dim: int = 1024, out_dim: int = 4096, region: int = 4, fine_regions: int = 18
    ):
        super().__init__()
        if region < 1:
            raise ValueError(f"region must be >= 1, got {region}")
        if fine_regions < 0:
            raise ValueError(f"fine_regions must be >= 0, got {fine_regions}")
        self.region, self.fine_regions = region, fine_regions
        self.scale_selector = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, 1))
        self.mm_projector = nn.Sequential(
            nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )

    @classmethod
    def count_setting(cls, keep: int, n_image: int) -> dict | None:
        # At the default 4 x 4 regions: keep = 15 * fine + regions.
        extra = keep - n_image // 16
        return {"fine_regions": extra // 15} if extra >= 0 and extra % 15 == 0 else None

    def _check(self, n: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
        h, w = grid if grid and grid[0] * grid[1] == n else (int(n**0.5),) * 2
        if h * w != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        if h % self.region or w % self.region:
            raise ValueError(f"region must divide the {h}x{w} patch grid, got {self.region}")
        if self.fine_regions > n // self.region**2:
            raise ValueError(
                f"fine_regions must be <= the {n // self.region**2} regions, "
                f"got {self.fine_regions}"
            )
        return h, w

    def num_tokens(self, n: int) -> int:
        self._check(n)
        r = n // self.region**2
        return self.fine_regions * self.region**2 + r - self.fine_regions

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        b, n, c = features.shape
        grid = self._check(n, signals.grid)
        windows = regions_of(features, grid, self.region)  # [B, R, r^2, C]
        coarse = windows.mean(2)  # [B, R, C]: one token per region (average pooling)
        p = self.scale_selector(coarse).squeeze(-1).float().sigmoid()  # [B, R]
        fine = p.topk(self.fine_regions, dim=1).indices  # [B, F]
        is_fine = torch.zeros_like(p, dtype=torch.bool).scatter_(1, fine, True)
        w_fine = (1 + p - p.detach()).to(features.dtype)[..., None, None]
        w_coarse = (1 + (1 - p) - (1 - p).detach()).to(features.dtype)[..., None]
        # Lay every region out as r^2 slots; a coarse region fills only its first slot.
        slots = torch.where(
            is_fine[..., None, None], windows * w_fine, (coarse * w_coarse)[:, :, None]
        )
        used = is_fine[..., None].expand(-1, -1, self.region**2).clone()
        used[:, :, 0] = True
        tokens = slots.flatten(1, 2)[used.flatten(1)].view(b, -1, c)  # raster order kept
        signals.state["focusllava"] = {"fine_regions": fine.sort(1).values, "scores": p}
        return self.mm_projector(tokens)


@register
class FocusLLaVA(LLMReducer):
    """The fine step: keep the image tokens the instruction attends to most (middle layer)."""

    catalog_id = "focusllava"
    kind = "pruning"
    needs = frozenset({"attn"})
    basis = "paper (provisional)"
    test_configs: ClassVar[dict[str, dict]] = {"zero": {"ratio": 0.0}, "some": {"ratio": 0.5}}

    def __init__(self, ratio: float = 0.5):
        super().__init__()
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio

    @classmethod
    def paper_placement(cls, num_layers: int, **kwargs) -> dict[int, FocusLLaVA]:
        # Guessed: the middle layer is the first to see the selected tokens.
        return {num_layers // 2 - 1: cls(**kwargs)} if num_layers > 2 else {}

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        layer = cfg.layers // 2 - 1
        return {"llm": {layer: cls(ratio=1 - keep / n_image)}}

    def kept(self, image_len: int) -> int:
        return image_len - round(image_len * self.ratio)

    def image_budget(self, n_image: int) -> tuple[int, int]:
        return self.kept(n_image), self.kept(n_image)

    def forward(self, h: Tensor, signals: LLMSignals) -> Reduction:
        start, length = signals.image_start, signals.image_len
        end = start + length
        with torch.no_grad():
            text = signals.valid[:, end:].float()  # [B, T]
            attn = signals.attn.float().mean(1)[:, end:, start:end]  # [B, T, Nv]
            relevance = (attn * text[..., None]).sum(1) / text.sum(1, keepdim=True).clamp(min=1)
            keep = relevance.topk(self.kept(length), dim=1).indices
        return keep_image_tokens(h, None, start, length, keep)


__all__ = ["FocusLLaVA", "VisionGuidedSampler", "regions_of"]
