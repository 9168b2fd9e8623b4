"""M3 (Matryoshka Multimodal Models): nested average pooling of the projected visual tokens.

Paper: "Matryoshka Multimodal Models", https://arxiv.org/abs/2405.17430
Official code: https://github.com/mu-cai/matryoshka-mm, ``llava/model/llava_arch.py``,
``LlavaMetaForCausalLM.matryoshka_vis_token_process`` (after ``encode_images``, whose
projector is ``build_vision_projector`` of ``llava/model/multimodal_projector/builder.py``).

Algorithm (Sec. 3):
1. Project the ``N = 24 * 24`` CLIP patch features with LLaVA-1.5's MLP projector
   (Linear, GELU, Linear; 1024 -> 4096), token by token.
2. Lay the projected tokens on their grid and average-pool them with a square kernel and
   stride ``side / sqrt(scale)`` down to ``scale`` tokens (``matryoshka_vis_token_scale``).
3. The scales are nested (1, 9, 36, 144, 576: each coarser grid is the pooling of a finer
   one); M3 fine-tunes the LLM on all of them at once (the loss averaged over scales), so
   one model takes any of these token counts at inference.

Deviations from the official code:
- Pooling acts on the projector's output, as in the official ``encode_images`` followed by
  ``matryoshka_vis_token_process``, not on the CLIP features before the projector.
- ``matryoshka_vis_token_scale`` defaults to 144, a reduction; the official default
  (``None``) pools nothing, which equals ``matryoshka_vis_token_scale=576`` here.
- The scale must be a square whose side divides the grid's: the official kernel
  ``int(sqrt(N / scale))`` silently truncates, so e.g. 100 on a 24x24 grid yields 144
  tokens there; here it is a ValueError. The grid comes from ``signals.grid`` where the
  host gives it (a non-square grid pools with a ``h/s x w/s`` kernel), else the square
  root of the token count as in the official code.
- Training over all scales (the official ``forward`` loop over the list of scales) is the
  caller's: ``matryoshka_pool`` gives every scale from one projection.
- Parameter names are the official ones (``mm_projector.0``, ``mm_projector.2``), so a
  released checkpoint's ``model.mm_projector.*`` keys load once ``model.`` is stripped.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register

SCALES = (1, 9, 36, 144, 576)  # the paper's nested token counts on LLaVA-1.5's 24x24 grid


def matryoshka_pool(x: Tensor, grid: tuple[int, int], scale: int) -> Tensor:
    """Average-pool a token grid to ``scale`` tokens with a kernel equal to its stride.

    Args:
        x: tokens ``[B, N, C]`` in row-major grid order, ``N = h * w``.
        grid: ``(h, w)``, both divisible by ``sqrt(scale)``.
        scale: token count out, a square.

    Returns:
        ``[B, scale, C]``, row-major.
    """
    b, _, c = x.shape
    (h, w), side = grid, math.isqrt(scale)
    cells = x.transpose(1, 2).reshape(b, c, h, w)
    kernel = (h // side, w // side)
    return F.avg_pool2d(cells, kernel, stride=kernel).flatten(2).transpose(1, 2)


@register
class MatryoshkaMM(Projector):
    """LLaVA's MLP projector, then average pooling to ``matryoshka_vis_token_scale`` tokens."""

    catalog_id = "matryoshka_mm"
    kind = "pooling"
    count_argument = "matryoshka_vis_token_scale"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "matryoshka_vis_token_scale": 4},
    }
    invalid_configs = (
        ({"matryoshka_vis_token_scale": 10}, "matryoshka_vis_token_scale"),
        ({"matryoshka_vis_token_scale": 0}, "matryoshka_vis_token_scale"),
        ({"mlp_depth": 0}, "mlp_depth"),
    )

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        matryoshka_vis_token_scale: int = 144,
        mlp_depth: int = 2,
    ):
        super().__init__()
        scale = matryoshka_vis_token_scale
        if scale < 1 or math.isqrt(scale) ** 2 != scale:
            raise ValueError(f"matryoshka_vis_token_scale must be a positive square, got {scale}")
        if mlp_depth < 1:
            raise ValueError(
                f"mlp_depth must be >= 1 (LLaVA's mlp{{depth}}x_gelu), got {mlp_depth}"
            )
        self.scale = scale
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(1, mlp_depth):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.mm_projector = nn.Sequential(*layers)

    def num_tokens(self, n: int) -> int:
        return self.scale

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        n = features.shape[1]
        h, w = signals.grid if signals.grid[0] * signals.grid[1] == n else (math.isqrt(n),) * 2
        if h * w != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        side = math.isqrt(self.scale)
        if h % side or w % side:
            raise ValueError(
                f"a {h}x{w} grid cannot be pooled to matryoshka_vis_token_scale={self.scale}"
            )
        return matryoshka_pool(self.mm_projector(features), (h, w), self.scale)
