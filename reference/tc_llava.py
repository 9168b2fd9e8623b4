"""TC-LLaVA: per-video average pooling of the projected frame tokens (provisional).

Paper: "TC-LLaVA: Rethinking the Transfer from Image to Video Understanding with Temporal
Considerations", https://arxiv.org/abs/2409.03206
Official code: none released.

PROVISIONAL: written from the paper's abstract and summaries (its body could not be read here).
The paper's contributions act inside the LLM and reduce nothing: a Temporal-Aware Dual RoPE
(a second, temporal position per token, shared by the visual tokens of one frame) and a
Frame-wise Block Causal Attention Mask (a frame's visual tokens see each other and every earlier
frame; text stays causal). What reduces tokens is the video projector in front of the LLM: the
catalog's reading is "pooled per-frame visual tokens", here taken to be PLLaVA's pooling projector
(a guess: the LLaVA-to-video pooling of the same period, not confirmed from TC-LLaVA's text).

Algorithm (video ``[B, T * N, C]``, frames of ``h x w`` patches):
1. LLaVA's two-layer GELU MLP maps every patch to the LLM width (``linear_1``, ``linear_2``).
2. The video ``[B, hidden, T, h, w]`` is average-pooled adaptively to ``(T', *pool_shape)``,
   ``T' = min(T, num_frames)``: 16 frames of 24 x 24 CLIP patches -> 16 x 144 tokens.
3. Tokens go to the LLM frame after frame; ``frame_block_causal_mask`` and
   ``temporal_positions`` give the mask and the temporal position ids its LLM hook needs.

Guessed (none of this could be checked against the paper's text):
- The reduction is PLLaVA's ``PllavaMultiModalProjector`` (MLP first, then
  ``AdaptiveAvgPool3d((16, 12, 12))``; magic-research/PLLaVA at 6f49fd2,
  ``models/pllava/modeling_pllava.py``) with its parameter names; defaults CLIP ViT-L/14-336
  (1024) into a 7B LLM (4096), 16 frames.
- Fewer than ``num_frames`` frames are kept as they are (PLLaVA repeats them up to 16, which for a
  single image gives 16 x 144 tokens, more than its 576 patches); more must be a multiple of
  ``num_frames`` (PLLaVA asserts it), pooled in equal windows.
- The mask and temporal ids: see the two functions. How the two RoPEs combine in attention
  is not implemented here (the host's job; see ``temporal_positions``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


def frame_block_causal_mask(prefix: int, frames: int, per_frame: int, suffix: int) -> Tensor:
    """The Frame-wise Block Causal Attention Mask of one sample, ``[N, N]`` (True = may attend).

    Layout ``[prefix text][frame 0] .. [frame T-1][suffix text]``, ``N = prefix + T * per_frame +
    suffix``. Causal by index, except that every visual token also sees the later tokens of its
    own frame: frames are blocks of a block-causal mask. Text rows are plain causal rows.
    """
    n = prefix + frames * per_frame + suffix
    idx = torch.arange(n)
    mask = idx[None, :] <= idx[:, None]
    frame = torch.full((n,), -1)
    frame[prefix : prefix + frames * per_frame] = torch.arange(frames).repeat_interleave(per_frame)
    same = (frame[:, None] == frame[None, :]) & (frame[:, None] >= 0)
    return mask | same


def temporal_positions(prefix: int, frames: int, per_frame: int, suffix: int) -> Tensor:
    """Temporal position ids ``[N]`` for the second RoPE of the Temporal-Aware Dual RoPE.

    Text tokens count up as usual; all tokens of frame ``t`` share ``prefix + t``; the suffix
    continues after the last frame, so text-to-text and frame-to-frame distances stay relative.
    (The ordinary RoPE keeps the sequence index of every token.)
    """
    frame_ids = prefix + torch.arange(frames).repeat_interleave(per_frame)
    return torch.cat(
        [torch.arange(prefix), frame_ids, prefix + frames + torch.arange(suffix)]
    ).long()


@register
class TCLLaVA(Projector):
    """Per-patch MLP, then adaptive average pooling of the video to ``(T', *pool_shape)``."""

    catalog_id = "tc_llava"
    kind = "pooling"
    basis = (
        "paper (provisional): no official code; the paper's body could not be read, so the "
        "token reduction is taken to be PLLaVA's pooling projector (see the guesses)"
    )
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "pool_shape": (2, 2), "num_frames": 4},
    }
    invalid_configs = (
        ({"pool_shape": (0, 12)}, "pool_shape"),
        ({"pool_shape": (12,)}, "pool_shape"),
        ({"num_frames": 0}, "num_frames"),
    )

    @classmethod
    def count_setting(cls, keep: int, n_image: int) -> dict | None:
        side = math.isqrt(keep)
        return {"pool_shape": (side, side)} if side * side == keep and keep < n_image else None

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        pool_shape: tuple[int, int] = (12, 12),
        num_frames: int = 16,
    ):
        super().__init__()
        if len(pool_shape) != 2 or min(pool_shape) < 1:
            raise ValueError(f"pool_shape must be two sides >= 1, got {pool_shape}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.pool_shape, self.num_frames = tuple(pool_shape), num_frames
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def out_frames(self, frames: int) -> int:
        """Frames after temporal pooling; refuses a count the window cannot divide."""
        if frames < 1 or (frames > self.num_frames and frames % self.num_frames):
            raise ValueError(
                f"frames must be <= num_frames={self.num_frames} or a multiple of it, got {frames}"
            )
        return min(frames, self.num_frames)

    def num_tokens(self, n: int, frames: int = 1) -> int:
        """Tokens out for ``n`` patch tokens in (``frames`` frames of ``n // frames``)."""
        return self.out_frames(frames) * self.pool_shape[0] * self.pool_shape[1]

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        b, total, _ = features.shape
        frames = int(signals.state.get("frames", 1))
        if frames < 1 or total % frames:
            raise ValueError(f"frames must divide the {total} tokens, got {frames}")
        per = total // frames
        h, w = signals.grid if signals.grid[0] * signals.grid[1] == per else (int(per**0.5),) * 2
        if h * w != per:
            raise ValueError(f"{per} patch tokens a frame are not a square grid; give signals.grid")
        if self.pool_shape[0] > h or self.pool_shape[1] > w:
            raise ValueError(f"pool_shape must fit the {h}x{w} grid, got {self.pool_shape}")
        t_out = self.out_frames(frames)
        x = self.linear_2(self.act(self.linear_1(features)))  # [B, T * N, hidden]
        video = x.reshape(b, frames, h, w, -1).permute(0, 4, 1, 2, 3)  # b d t h w
        pooled = F.adaptive_avg_pool3d(video, (t_out, *self.pool_shape))
        return pooled.flatten(2).transpose(1, 2)  # 'b d t h w -> b (t h w) d'
