"""InTI: Inter-frame Token Interpolation.

Paper: "Dynamic and Compressive Adaptation of Transformers From Images to Videos",
https://arxiv.org/abs/2408.06840
Official code: none released (the catalog lists no repository).

Algorithm (Sec. 3):
1. Between two blocks, the video tokens ``[T, h, w, C]`` are split into pairs of
   neighbouring frames ``(2t, 2t + 1)``.
2. A light multi-scale context-aware network (depth-wise spatio-temporal
   convolutions of several kernel sizes) predicts one logit per token; a softmax
   over each same-position pair gives its two interpolation weights.
3. Each pair is replaced by the weighted sum of its two tokens, so the number of
   frames (and tokens) halves at every InTI step while the spatio-temporal grid
   stays intact.

Deviations from the official code (there is none; these are against the paper):
- Host mapping: the paper adapts a frame-wise image ViT (CLIP) whose batch holds
  ``B x T`` frames, each with its own CLS token. Merging across batch items breaks
  the contract, so here a video is one frame-major sequence of ``T x P`` patch
  tokens after a shared prefix (a joint space-time ViT); ``frame_tokens = P`` is
  the number of patches per frame, and ``T`` follows from the sequence length, so
  stacked InTI steps need no shared state. The step runs at a ``"pre"`` hook, i.e.
  between two blocks, as in the paper.
- Prefix tokens are protected and pass through unchanged; the paper's per-frame
  CLS tokens would be interpolated like the patches.
- The predictor's layout (LayerNorm, linear down-projection, the sum of
  depth-wise ``Conv3d`` branches with kernels ``(3, k, k)`` for ``k`` in
  ``scales``, GELU, a linear head giving one logit per token) is our reading of
  the paper's description; its exact widths and kernel sizes could not be
  checked against released code.
- With an odd number of frames the last frame has no partner and is carried
  through unchanged, as are trailing tokens that do not fill a whole frame
  (the paper uses even frame counts and no such tokens).
- A fused token is a weighted sum, not a size-weighted mean; its size is the sum
  of the pair's sizes. Its ``index`` is -1 (a new token).
- Training and inference share one path: the softmax weights are differentiable
  and the paper halves the frames in training too, so no mask is returned. The
  adaptation recipe (frozen or fine-tuned backbone, temporal modules) is left out.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity
from reference.registry import register


def frame_layout(p: int) -> tuple[int, int]:
    """Spatial ``(h, w)`` of ``p`` tokens per frame: a square if possible, else one row."""
    h = math.isqrt(p)
    return (h, h) if h * h == p else (1, p)


def pair_weights(logits: Tensor) -> Tensor:
    """``logits [B, T, P]`` -> weights ``[B, T // 2, 2, P]``: a softmax within each pair."""
    b, t, p = logits.shape
    pairs = logits[:, : t // 2 * 2].reshape(b, t // 2, 2, p)
    return pairs.float().softmax(dim=2).to(logits.dtype)


def interpolate_frames(frames: Tensor, weights: Tensor) -> Tensor:
    """Fuse ``frames [B, T, P, C]`` pairwise with ``weights [B, T // 2, 2, P]``.

    Returns ``[B, T // 2, P, C]``: token ``i`` of pair ``t`` is
    ``w0 * frames[2t, i] + w1 * frames[2t + 1, i]`` (the interpolation of Sec. 3);
    an odd last frame is not included.
    """
    b, t, p, c = frames.shape
    pairs = frames[:, : t // 2 * 2].reshape(b, t // 2, 2, p, c)
    return (weights[..., None] * pairs).sum(dim=2)


class ContextPredictor(nn.Module):
    """The multi-scale context-aware weight network: one logit per token."""

    def __init__(self, dim: int, hidden: int, scales: tuple[int, ...]):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.down = nn.Linear(dim, hidden)
        # Depth-wise 3D convolutions: each branch sees a different spatial context.
        self.branches = nn.ModuleList(
            nn.Conv3d(hidden, hidden, (3, k, k), padding=(1, k // 2, k // 2), groups=hidden)
            for k in scales
        )
        self.act = nn.GELU()
        self.head = nn.Linear(hidden, 1)

    def forward(self, frames: Tensor) -> Tensor:
        """``frames [B, T, P, C]`` -> logits ``[B, T, P]``."""
        b, t, p, _ = frames.shape
        h, w = frame_layout(p)
        z = self.down(self.norm(frames))  # [B, T, P, hidden]
        z = z.permute(0, 3, 1, 2).reshape(b, -1, t, h, w)  # 'b t (h w) c -> b c t h w'
        z = sum(branch(z) for branch in self.branches)
        z = self.act(z).flatten(3).permute(0, 2, 3, 1)  # [B, T, P, hidden]
        return self.head(z)[..., 0]


@register
class InTI(TokenReducer):
    """Halve the frames of a frame-major token sequence by learned interpolation.

    Args:
        frame_tokens: patch tokens per frame ``P``; 0 turns the step off.
        dim: token width ``C``.
        hidden: width of the weight network.
        scales: spatial kernel sizes of its depth-wise convolution branches.
    """

    catalog_id = "inti"
    basis = "abstract only (no official code; paper text unavailable)"
    kind = "merging"
    where = "pre"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"frame_tokens": 0, "dim": 32, "hidden": 8},
        "some": {"frame_tokens": 4, "dim": 32, "hidden": 8},
    }

    def __init__(
        self,
        frame_tokens: int = 196,
        dim: int = 768,
        hidden: int = 192,
        scales: tuple[int, ...] = (1, 3, 5),
    ):
        super().__init__()
        if frame_tokens < 0:
            raise ValueError(f"frame_tokens must be >= 0, got {frame_tokens}")
        self.frame_tokens = frame_tokens
        self.predictor = ContextPredictor(dim, hidden, scales)

    def _frames(self, n: int, prefix: int) -> int:
        """Whole frames among the ``n - prefix`` non-prefix tokens (0 when off)."""
        return (n - prefix) // self.frame_tokens if self.frame_tokens > 0 else 0

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        pairs = self._frames(n, prefix) // 2
        out = n - pairs * self.frame_tokens
        return out, out

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, c = x.shape
        prefix, p = signals.prefix, self.frame_tokens
        t = self._frames(n, prefix)
        if t < 2:
            return identity(x, signals.size)
        if b == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(n, prefix)[0])
        fused_len = t // 2 * 2 * p  # tokens that find a partner; the rest is the tail
        frames = x[:, prefix : prefix + t * p].reshape(b, t, p, c)  # 'b (t p) c -> b t p c'
        weights = pair_weights(self.predictor(frames))  # [B, T // 2, 2, P]
        fused = interpolate_frames(frames, weights).flatten(1, 2)  # [B, T // 2 * P, C]
        out_x = torch.cat([x[:, :prefix], fused, x[:, prefix + fused_len :]], dim=1)

        dev = x.device
        pos = torch.arange(n - prefix, device=dev)
        slot = torch.where(pos < fused_len, (pos // p) // 2 * p + pos % p, pos - fused_len // 2)
        assign = torch.cat([torch.arange(prefix, device=dev), prefix + slot]).expand(b, n)
        size = signals.size.new_zeros(b, out_x.shape[1], 1)
        size = size.scatter_add(1, assign[..., None], signals.size)  # a pair's sizes add up
        index = torch.full((out_x.shape[1],), -1, dtype=torch.long, device=dev)
        index[:prefix] = torch.arange(prefix, device=dev)
        tail_out = prefix + fused_len // 2
        index[tail_out:] = torch.arange(prefix + fused_len, n, device=dev)  # carried through
        return Reduction(x=out_x, size=size, index=index.expand(b, -1), assign=assign)
