"""Dynamic-VLM: per-frame adaptive average pooling to a size set by the video's length.

Paper: "Dynamic-VLM: Simple Dynamic Visual Token Compression for VideoLLM",
https://arxiv.org/abs/2412.09530
Official code: https://github.com/Hon-Wong/ByteVideoLLM,
``models/adapter/dynamic_spatial_pooling.py`` (``DynamicSpatialPooling``, the
``dynamic_spatial_pooling`` adapter) followed by
``models/adapter/projector.py`` (``build_projector``, the ``llm_proj`` of ``models/video_llm.py``).

Algorithm, per video of ``T`` frames of ``N = h * w`` patch features:
1. Budget: ``k = min(max_video_tokens // T, out_token_num)`` tokens a frame (in training, the
   official draws ``k`` from ``[min_out_token_num, out_token_num]`` before the ``// T`` cap).
2. ``k == in_token_num``: the frame keeps its patches; else it is average-pooled
   (``adaptive_avg_pool2d``) to ``s x s``, ``s = max(1, floor(sqrt(k)))``.
3. The projector (LLaVA's ``mlp2x_gelu``) maps every token to the LLM width; the frames follow
   each other: short videos keep detail, long ones fit the budget.

Conventions: video frames as ``reference.llama_vid``: ``features [B, T * N, C]`` frame after
frame, ``signals.grid`` the grid of ONE frame, ``signals.state["frames"] = T`` (none: an image,
``T = 1``); every sample of a batch has ``T`` frames. Output ``[B, T * s * s, out_dim]``.
Default configuration: ``configs/sample_config.yaml`` (CLIP ViT-L/336, 1024 wide, 576 patches;
``out_token_num`` 576, ``min_out_token_num`` 100, ``max_video_tokens`` 3200) into Qwen2.5-7B
(3584): 16,522,240 parameters (the projector; pooling has none), as the official. Up to 5
frames keep all 576 patches; 100 frames (the config's ``max_batch_frames``) get 5 x 5 each.
The class's own defaults there are 144 / 16 / 2048 (used by no released config).

Deviations from the official code:
- The grid comes from ``signals.grid`` where it matches (the official takes ``sqrt(N)``); a
  per-frame count that is not a grid is a ValueError. A budget that would pool a frame to
  more cells than its grid has (the official then upsamples) is a ValueError.
- Training: one count is drawn per forward (the official draws one per video), with
  ``torch.randint`` instead of Python's ``random``; ``fix_randam`` (the official spelling)
  keeps the evaluation rule in training, as there. Frames of different lengths in one batch
  (the official's ``n_frames`` list) are separate calls here.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


def frame_token_count(
    frames: int, out_token_num: int, max_video_tokens: int, min_out_token_num: int | None = None
) -> int:
    """Tokens a frame is allowed (step 1): the budget split over ``frames``, capped at
    ``out_token_num``; with ``min_out_token_num`` (training) a random draw replaces the cap."""
    k = out_token_num
    if min_out_token_num is not None:
        k = int(torch.randint(min_out_token_num, out_token_num + 1, ()).item())
    return min(max_video_tokens // frames, k)


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """The official projector types: ``linear``, ``mlp{k}x_gelu``, ``identity``."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"projector_type must be linear, mlpKx_gelu or identity, got {kind!r}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(1, int(match.group(1))):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


@register
class DynamicVLM(Projector):
    """Pool each frame to a grid sized by the frame count and token budget, then project."""

    catalog_id = "dynamic_vlm"
    kind = "pooling"
    count_argument = "out_token_num"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {
            "in_dim": 32,
            "out_dim": 64,
            "in_token_num": 16,
            "out_token_num": 4,
            "min_out_token_num": 1,
            "max_video_tokens": 64,
        },
    }
    invalid_configs = (
        ({"out_token_num": 0}, "out_token_num"),
        ({"out_token_num": 17}, "out_token_num"),
        ({"min_out_token_num": 5}, "min_out_token_num"),
        ({"max_video_tokens": 0}, "max_video_tokens"),
        ({"projector_type": "mlp0x_gelu"}, "projector_type"),
    )

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 3584,
        in_token_num: int = 576,
        out_token_num: int = 576,
        min_out_token_num: int = 100,
        max_video_tokens: int = 3200,
        projector_type: str = "mlp2x_gelu",
        fix_randam: bool = False,
    ):
        super().__init__()
        if not 1 <= out_token_num <= in_token_num:
            raise ValueError(
                f"out_token_num must be in [1, in_token_num={in_token_num}], got {out_token_num}"
            )
        if not 1 <= min_out_token_num <= out_token_num:
            raise ValueError(
                f"min_out_token_num must be in [1, out_token_num={out_token_num}], "
                f"got {min_out_token_num}"
            )
        if max_video_tokens < 1:
            raise ValueError(f"max_video_tokens must be >= 1, got {max_video_tokens}")
        self.in_token_num, self.out_token_num = in_token_num, out_token_num
        self.min_out_token_num, self.max_video_tokens = min_out_token_num, max_video_tokens
        self.fix_randam = fix_randam
        self.llm_proj = build_projector(projector_type, in_dim, out_dim)

    @classmethod
    def count_setting(cls, keep: int, n_image: int) -> dict | None:
        """``out_token_num = keep`` (an image: one frame, within the budget), the training
        minimum lowered to it where the default's 100 is above it."""
        return {"out_token_num": keep, "min_out_token_num": min(100, keep)}

    def _per_frame(self, frames: int) -> int:
        random = self.training and not self.fix_randam
        low = self.min_out_token_num if random else None
        return frame_token_count(frames, self.out_token_num, self.max_video_tokens, low)

    def num_tokens(self, n: int, frames: int = 1) -> int:
        """Tokens out for ``n`` patch tokens over ``frames`` frames (the evaluation rule)."""
        k = min(self.max_video_tokens // frames, self.out_token_num)
        if k == self.in_token_num:
            return n
        return frames * max(1, math.isqrt(k)) ** 2

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        b, total, c = features.shape
        frames = int(signals.state.get("frames", 1))
        if frames < 1 or total % frames:
            raise ValueError(f"frames must divide the {total} tokens, got {frames}")
        n = total // frames
        h, w = signals.grid if signals.grid[0] * signals.grid[1] == n else (math.isqrt(n),) * 2
        if h * w != n:
            raise ValueError(f"{n} patch tokens a frame are not a square grid; give signals.grid")
        k = self._per_frame(frames)
        x = features.reshape(b * frames, n, c)
        if k != self.in_token_num:
            side = max(1, math.isqrt(k))
            if side > min(h, w):
                raise ValueError(
                    f"out_token_num must give at most a {h}x{w} grid a frame "
                    f"(in_token_num={self.in_token_num} is not this frame's {n}), got {k}"
                )
            cells = x.transpose(1, 2).unflatten(2, (h, w))  # [B*T, C, h, w]
            x = F.adaptive_avg_pool2d(cells, side).flatten(2).transpose(1, 2)
        out = self.llm_proj(x)
        return out.reshape(b, -1, out.shape[-1])  # [B, T * s * s, out_dim], frame after frame
