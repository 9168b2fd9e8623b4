"""InternVL 1.5: pixel shuffle (space-to-depth) of the ViT grid, then an MLP projector.

Paper: "How Far Are We to GPT-4V? Closing the Gap to Commercial Multimodal Models with
Open-Source Suites", https://arxiv.org/abs/2404.16821
Official code: https://github.com/OpenGVLab/InternVL,
``internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py``,
``InternVLChatModel.pixel_shuffle``, ``.mlp1`` and ``.extract_feature``.

Algorithm (Sec. 3.1, "pixel shuffle"; strictly a pixel *unshuffle*):
1. Lay the ``N = h * w`` InternViT patch features (CLS dropped) out on their grid.
2. Fold every ``k x k`` block (``k = 1 / downsample_ratio``, 2 in the paper) into the
   channels: ``[h, w, C] -> [h/k, w/k, k*k*C]``; a 448 px tile goes 1024 -> 256 tokens.
3. Project each folded token with ``mlp1``: LayerNorm, Linear, GELU, Linear
   (InternViT-6B 3200 * 4 -> InternLM2-20B 6144 in InternVL-Chat-V1-5).

Deviations from the official code:
- The grid comes from ``signals.grid`` where the host gives it, else the square root of
  the token count (the official code always takes the square root); the folding itself
  is the official one for square and non-square grids alike.
- ``ps_version`` defaults to ``"v1"``: the default of ``InternVLChatConfig`` and of the
  fine-tuning script since InternVL 1.5's release (commit a08ba33); the training scripts
  published in May 2024 pass ``"v2"``, the fix for the transposed grid. The released
  InternVL-Chat-V1-5 ``config.json`` could not be read from here to confirm its value.
  ``"v1"`` leaves the folded grid transposed (tokens in column-major block order);
  ``"v2"`` restores row-major order. Both are as in the official ``pixel_shuffle``.
- Only ``downsample_ratio = 1 / k`` with an integer ``k >= 2`` is accepted: other ratios
  make the official ``mlp1`` width (``C * int(1 / r) ** 2``) disagree with the shuffled
  width, and ``k = 1`` reduces nothing. A grid side not divisible by ``k`` is refused
  (the official ``view`` fails on it).
- Parameter names are the official ones (``mlp1.0`` LayerNorm, ``mlp1.1`` and ``mlp1.3``
  Linear), so the ``mlp1.*`` keys of a released checkpoint load as they are.
"""

from __future__ import annotations

import math
from typing import ClassVar

from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


def pixel_unshuffle(x: Tensor, grid: tuple[int, int], k: int, ps_version: str = "v1") -> Tensor:
    """Fold every ``k x k`` block of the patch grid into the channels.

    Args:
        x: patch features ``[B, N, C]`` in row-major grid order, ``N = h * w``.
        grid: ``(h, w)``, both divisible by ``k``.
        k: block side (``1 / downsample_ratio``).
        ps_version: ``"v1"`` keeps the official transposed block order, ``"v2"`` row-major.

    Returns:
        ``[B, N / k^2, k^2 * C]``; each token's channels are ``(row offset, column offset,
        C)``, row offset outermost, as the official ``pixel_shuffle`` lays them out.
    """
    b, n, c = x.shape
    h, w = grid
    blocks = x.reshape(b, h // k, k, w // k, k, c)  # b (i q) (j p) c
    if ps_version == "v1":  # -> b j i (q p c): the official v1 leaves the grid transposed
        blocks = blocks.permute(0, 3, 1, 2, 4, 5)
    else:  # -> b i j (q p c)
        blocks = blocks.permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(b, n // (k * k), k * k * c)


@register
class InternVL15(Projector):
    """Pixel unshuffle of the patch grid by ``1 / downsample_ratio``, then ``mlp1``."""

    catalog_id = "internvl_1_5"
    kind = "pixel-shuffle"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "downsample_ratio": 0.5},
    }
    invalid_configs = (
        ({"downsample_ratio": 0.4}, "downsample_ratio"),
        ({"downsample_ratio": 1.0}, "downsample_ratio"),
        ({"ps_version": "v3"}, "ps_version"),
    )

    @classmethod
    def count_setting(cls, keep: int, n_image: int) -> dict | None:
        k = math.isqrt(n_image // keep) if keep and n_image % keep == 0 else 0
        return {"downsample_ratio": 1 / k} if k > 1 and k * k * keep == n_image else None

    def __init__(
        self,
        in_dim: int = 3200,
        out_dim: int = 6144,
        downsample_ratio: float = 0.5,
        ps_version: str = "v1",
    ):
        super().__init__()
        k = round(1 / downsample_ratio) if downsample_ratio > 0 else 0
        if k < 2 or not math.isclose(downsample_ratio * k, 1.0):
            raise ValueError(
                f"downsample_ratio must be 1/k for an integer k >= 2, got {downsample_ratio}"
            )
        if ps_version not in ("v1", "v2"):
            raise ValueError(f"ps_version must be 'v1' or 'v2', got {ps_version!r}")
        self.downsample_ratio, self.k, self.ps_version = downsample_ratio, k, ps_version
        width = in_dim * k * k
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )

    def num_tokens(self, n: int) -> int:
        return n // (self.k * self.k)

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        n = features.shape[1]
        h, w = signals.grid if signals.grid[0] * signals.grid[1] == n else (math.isqrt(n),) * 2
        if h * w != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        if h % self.k or w % self.k:
            raise ValueError(
                f"a {h}x{w} grid cannot be folded by downsample_ratio={self.downsample_ratio}"
            )
        return self.mlp1(pixel_unshuffle(features, (h, w), self.k, self.ps_version))
