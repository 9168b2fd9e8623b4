"""RLT: Run-Length Tokenization.

Paper: "Don't Look Twice: Faster Video Transformers with Run-Length Tokenization",
https://arxiv.org/abs/2411.05222
Official code: https://github.com/rccchoudhury/rlt (``src/models/static_token_utils.py``:
``batched_find_idxs_to_keep``, ``batched_get_token_lengths``; ``src/models/tokenizer.py``;
``src/models/vit_helpers.py``: ``length_embed``)

Algorithm (Sec. 3, before the transformer runs, no learned score):
1. Compare every patch with the patch at the same position in the previous frame:
   the mean absolute difference; the first frame is always kept.
2. A patch whose difference is not above a threshold repeats its predecessor and is
   dropped; a kept patch starts a run that lasts until the next kept patch at its
   position (or the end of the clip), and the run length is its number of frames.
3. Optionally (the length encoding used in fine-tuning), a learned embedding of the
   run length is added to every kept token.

Deviations from the official code:
- Host mapping (the ``inti`` convention): a video is one frame-major sequence of
  ``T x P`` patch tokens after the protected prefix; ``frame_tokens = P`` and
  ``T`` follows from the sequence length. Tokens that do not fill a whole last
  frame are carried through unchanged (the official clips have whole frames).
- What is compared: the host only hands over tokens, so the step runs at the
  ``"pre"`` hook (use block 0: before any attention, as the official tokenizer)
  and compares tokens, the mean over channels of ``|x_t - x_(t-1)|``, instead of
  the mean absolute *pixel* difference of a tubelet's patch (the official code
  compares the last frame of tubelet ``t`` with the first frame of tubelet
  ``t - 1``). The threshold is therefore in token units (the official 0.1 is in
  ImageNet-normalised pixels) and includes whatever the host added to the tokens
  (position or temporal embeddings shift the differences).
- Keep rule as in the official code: keep iff the difference is strictly above
  ``threshold`` (a difference equal to it is dropped); every patch is compared
  with its predecessor in the input, not with the head of its run.
- Sizes and ``assign``: a kept token's ``size`` is the sum of the sizes of its run
  (the number of frames it stands for when sizes are one); a dropped token is
  assigned to its run's kept token, so sizes and ``assign`` agree. Tokens are
  not averaged: the kept token is the first patch of its run, unchanged.
- Batches: the official code packs all clips into one sequence with a
  block-diagonal attention mask (xformers). The host has none, so each clip keeps
  exactly its own tokens, in order, and the batch is padded to the largest count
  with empty slots (x 0, size 0, index -1, ``Reduction.mask`` 0; shared helper
  ``reference.ops.keep_padded``); with the host's proportional attention
  they get no attention.
- ``max_keep`` (default 1.0, i.e. off) is not in the paper: it caps the kept
  fraction of the tokens after the first frame (largest differences first), only
  so that ``budget`` has an upper bound below ``n`` for a configuration.
- Length encoding: a ``[length_frames, C]`` parameter (truncated normal, std
  0.02, as the official ``length_embed``) indexed by run length - 1 (clamped to
  the last row), added to the kept whole-frame tokens; off by default
  (``length_frames=0``). Each token gets its own run length; the released
  ``batched_get_token_lengths`` lists lengths position-major while the tokens are
  frame-major (the golden fixture test compares them in that order). Training and inference
  share one path (the paper fine-tunes with the tokens dropped), so no soft mask; the
  fine-tuning recipe is left out.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity
from reference.ops import keep_padded
from reference.registry import register


def frame_differences(frames: Tensor) -> Tensor:
    """Mean absolute difference to the same position in the previous frame.

    Args:
        frames: ``[B, T, P, C]`` frame-major patch tokens.

    Returns:
        ``[B, T, P]`` float32; frame 0 has ``+inf`` (always kept, the official
        code pads a dummy difference of 255).
    """
    with torch.no_grad():
        diff = (frames[:, 1:].float() - frames[:, :-1].float()).abs().mean(dim=-1)
        first = torch.full_like(diff[:, :1], torch.inf)
        return torch.cat([first, diff], dim=1)  # [B, T, P]


def static_keep(diff: Tensor, threshold: float, max_keep: float = 1.0) -> Tensor:
    """Keep mask ``[B, T, P]``: frame 0, and patches whose difference exceeds ``threshold``.

    With ``max_keep < 1`` at most ``floor(max_keep * (T - 1) * P)`` patches after
    the first frame survive, largest differences first.
    """
    keep = diff > threshold  # [B, T, P]
    if max_keep >= 1:
        return keep
    b, t, p = diff.shape
    rest_keep, rest_diff = keep[:, 1:].flatten(1), diff[:, 1:].flatten(1)  # [B, (T-1) P]
    cap = int(max_keep * (t - 1) * p)
    order = torch.where(rest_keep, rest_diff, -torch.inf).argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)
    rest_keep = rest_keep & (rank < cap)
    return torch.cat([keep[:, :1], rest_keep.reshape(b, t - 1, p)], dim=1)


def run_heads(keep: Tensor) -> Tensor:
    """For every patch ``[B, T, P]``, the frame of the kept patch whose run it belongs to."""
    t = keep.shape[1]
    frame = torch.arange(t, device=keep.device)[None, :, None]
    # The latest kept frame at or before t (frame 0 is always kept).
    return torch.where(keep, frame, 0).cummax(dim=1).values  # [B, T, P]


@register
class RLT(TokenReducer):
    """Drop patches that repeat the previous frame; a kept patch stands for its run.

    Args:
        frame_tokens: patch tokens per frame ``P``; 0 turns the step off.
        threshold: a patch is kept iff its mean absolute difference to the previous
            frame is above this (token units).
        max_keep: cap on the kept fraction after the first frame (not in the paper).
        length_frames: rows of the learned run-length embedding (the clip's frame
            count); 0 leaves the length encoding out.
        dim: token width ``C`` (only used by the length embedding).
    """

    catalog_id = "rlt"
    kind = "pruning"
    where = "pre"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"frame_tokens": 0},
        "some": {
            "frame_tokens": 4,
            "threshold": 1.1,
            "max_keep": 0.75,
            "length_frames": 4,
            "dim": 32,
        },
    }

    def __init__(
        self,
        frame_tokens: int = 196,
        threshold: float = 0.1,
        max_keep: float = 1.0,
        length_frames: int = 0,
        dim: int = 768,
    ):
        super().__init__()
        if not 0 < max_keep <= 1:
            raise ValueError(f"max_keep must be in (0, 1], got {max_keep}")
        if frame_tokens < 0:
            raise ValueError(f"frame_tokens must be >= 0, got {frame_tokens}")
        if length_frames < 0:
            raise ValueError(f"length_frames must be >= 0, got {length_frames}")
        self.frame_tokens = frame_tokens
        self.threshold = threshold
        self.max_keep = max_keep
        self.length_embed = None
        if length_frames > 0:
            self.length_embed = nn.Parameter(torch.empty(length_frames, dim))
            nn.init.trunc_normal_(self.length_embed, std=0.02)

    def _frames(self, n: int, prefix: int) -> int:
        return (n - prefix) // self.frame_tokens if self.frame_tokens > 0 else 0

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        t = self._frames(n, prefix)
        if t < 2:
            return n, n
        rest = (t - 1) * self.frame_tokens
        cap = rest if self.max_keep >= 1 else int(self.max_keep * rest)
        return n - rest, n - rest + cap

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, c = x.shape
        prefix, p = signals.prefix, self.frame_tokens
        t = self._frames(n, prefix)
        if t < 2:
            return identity(x, signals.size)
        if b == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(n, prefix)[0])
        body = slice(prefix, prefix + t * p)
        frames = x[:, body].reshape(b, t, p, c)  # 'b (t p) c -> b t p c'
        keep = static_keep(frame_differences(frames), self.threshold, self.max_keep)  # [B, T, P]

        # Every patch's run head as a token index into x.
        pos = torch.arange(p, device=x.device)
        head = (prefix + run_heads(keep) * p + pos).flatten(1)  # [B, T P]
        # A kept token stands for its whole run: sizes add up, lengths count frames.
        run_size = torch.zeros_like(signals.size)
        run_size = run_size.scatter_add(1, head[..., None], signals.size[:, body])  # [B, N, 1]
        size = signals.size.clone()
        size[:, body] = run_size[:, body]
        if self.length_embed is not None:
            length = torch.zeros(b, n, dtype=torch.long, device=x.device)
            length = length.scatter_add(1, head, torch.ones_like(head))[:, body]  # [B, T P]
            rows = (length - 1).clamp(0, self.length_embed.shape[0] - 1)
            encoded = x[:, body] + self.length_embed[rows].to(x.dtype)  # [B, T P, C]
            x = torch.cat([x[:, :prefix], encoded, x[:, body.stop :]], dim=1)

        # Tail tokens (not a whole frame) are always kept.
        keep_all = torch.cat([keep.flatten(1), keep.new_ones(b, n - body.stop)], dim=1)
        out = keep_padded(x, size, prefix, keep_all)
        # A dropped patch goes to its run's kept token (keep_padded marks it -1).
        assign = out.assign.clone()
        assign[:, body] = out.assign.gather(1, head)
        return Reduction(x=out.x, size=out.size, index=out.index, assign=assign, mask=out.mask)
