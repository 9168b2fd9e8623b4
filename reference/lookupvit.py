"""LookupViT: compressed tokens that look up a high-resolution token set.

Paper: "LookupViT: Compressing visual information to a limited number of tokens",
https://arxiv.org/abs/2407.12753
Official code: none released (the catalog lists no repository); the unofficial
re-implementation lucidrains/vit-pytorch ``vit_pytorch/look_vit.py`` was read for
comparison.

Algorithm (Sec. 3):
1. The ``N`` patch tokens form the *lookup* set; ``M << N`` *compressed* tokens are
   made by bilinearly resizing the lookup grid to ``sqrt(M) x sqrt(M)``.
2. Information gathering: the compressed tokens query the lookup tokens with
   multi-head cross-attention (``MHBC_{l->p}``) and add the result residually.
3. Only the ``M`` compressed tokens then go through the expensive self-attention and
   MLP; the lookup tokens get a cheap update from the compressed ones that reuses
   the transposed cross-attention logits (``MHBC_{p->l}``) and a narrow MLP.

Deviations from the official code (there is none; these are against the paper):
- Host mapping: LookupViT is a whole architecture with two token streams in every
  block; the host is a plain single-stream ViT. This module is the compression
  step only (steps 1-2), placed at a ``"pre"`` hook (between two blocks): its
  output is the prefix followed by the ``M`` compressed tokens, and the host's
  remaining blocks play the role of step 3's self-attention + MLP on them.
- The lookup stream is then dropped: the reverse cross-attention ``MHBC_{p->l}``,
  the lookup-token MLP, the per-block repetition of the exchange and the final
  pooling of both streams are left out, because the host has no second stream
  and no hook where lookup tokens could come back.
- Prefix tokens (CLS) are not part of the lookup grid: they are neither
  resized nor attended to and pass through unchanged (the paper pools instead
  of using a CLS token).
- The non-prefix tokens are read as a square grid in row-major order (the step
  must come before any other reduction); a count that is not a square is read
  as one row and resized linearly to ``side²`` tokens. A budget ``side² = 0``
  or not below the token count is the identity.
- ``size``/``assign`` need a hard owner for each lookup token although
  attention is soft: each lookup token is assigned to the compressed token whose
  cell of the ``side x side`` partition of the grid contains it, and a
  compressed token's size is the sum of its cell's sizes (sizes add up).
- Token sizes do not enter the cross-attention (no ``log(size)`` bias): the step
  expects the intact grid, where every size is one.
- Training recipe (from-scratch training, multi-resolution ``M`` sampled per
  batch) is not reproduced; training and inference use the same hard path, as in
  the paper (the token count is reduced in both).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity
from reference.registry import register


def grid_shapes(n: int, m: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(h, w)`` of ``n`` lookup and ``m`` compressed tokens.

    Both are squares when ``n`` and ``m`` are; otherwise both are read as one row.
    """
    g, s = math.isqrt(n), math.isqrt(m)
    if g * g == n and s * s == m:
        return (g, g), (s, s)
    return (1, n), (1, m)


def compress_grid(lookup: Tensor, m: int) -> Tensor:
    """Initial compressed tokens: ``lookup [B, N, C]`` resized bilinearly to ``[B, m, C]``."""
    b, n, c = lookup.shape
    big, small = grid_shapes(n, m)
    grid = lookup.transpose(1, 2).reshape(b, c, *big)  # 'b (h w) c -> b c h w'
    out = F.interpolate(grid, size=small, mode="bilinear", align_corners=False)
    return out.flatten(2).transpose(1, 2)  # [B, m, C]


def cell_assignment(n: int, m: int, device: torch.device) -> Tensor:
    """``[n]``: the compressed token (row-major) whose grid cell holds each lookup token."""
    (h, w), (sh, sw) = grid_shapes(n, m)
    rows = torch.arange(h, device=device) * sh // h
    cols = torch.arange(w, device=device) * sw // w
    return (rows[:, None] * sw + cols[None, :]).flatten()


def cross_attention(query: Tensor, context: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Multi-head attention of ``query [B, M, C]`` over ``context``.

    ``context`` holds keys and values, ``[B, 2, N, C]``. Returns the attended values
    ``[B, M, C]`` and the probabilities ``[B, H, M, N]`` (``MHBC_{l->p}``: the
    softmax runs over the lookup tokens).
    """
    b, m, c = query.shape
    d = c // heads
    q = query.reshape(b, m, heads, d).transpose(1, 2)  # [B, H, M, D]
    k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in context.unbind(1))  # [B, H, N, D]
    attn = ((q @ k.transpose(-1, -2)) * d**-0.5).softmax(dim=-1)  # [B, H, M, N]
    return (attn @ v).transpose(1, 2).reshape(b, m, c), attn


@register
class LookupViT(TokenReducer):
    """Compress the patch grid to ``side x side`` tokens that cross-attend to it.

    Args:
        side: side of the compressed grid (``M = side²``); 0 turns the step off.
        dim: token width ``C``.
        heads: heads of the gathering cross-attention.
    """

    catalog_id = "lookupvit"
    basis = "abstract and an unofficial reimplementation (no official code)"
    kind = "compression-tokens"
    where = "pre"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"side": 0, "dim": 32, "heads": 4},
        "some": {"side": 2, "dim": 32, "heads": 4},
    }

    def __init__(self, side: int = 7, dim: int = 768, heads: int = 12):
        super().__init__()
        if side < 0:
            raise ValueError(f"side must be >= 0, got {side}")
        if dim % heads:
            raise ValueError("dim must be divisible by heads")
        self.side, self.heads = side, heads
        self.norm_compressed = nn.LayerNorm(dim, eps=1e-6)
        self.norm_lookup = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def _active(self, n: int, prefix: int) -> bool:
        return 0 < self.side**2 < n - prefix

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        out = prefix + self.side**2 if self._active(n, prefix) else n
        return out, out

    def gather(self, lookup: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 1-2: ``lookup [B, N, C]`` -> compressed ``[B, M, C]`` and the attention."""
        b, n, c = lookup.shape
        compressed = compress_grid(lookup, self.side**2)  # [B, M, C]
        context = self.kv(self.norm_lookup(lookup)).reshape(b, n, 2, c).transpose(1, 2)
        gathered, attn = cross_attention(
            self.q(self.norm_compressed(compressed)), context, self.heads
        )
        return compressed + self.proj(gathered), attn  # residual information gathering

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, _ = x.shape
        prefix = signals.prefix
        if not self._active(n, prefix):
            return identity(x, signals.size)
        if b == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(n, prefix)[0])
        compressed, _ = self.gather(x[:, prefix:])
        m = compressed.shape[1]
        dev = x.device

        cell = prefix + cell_assignment(n - prefix, m, dev)  # [N - prefix]
        pre = torch.arange(prefix, device=dev)
        assign = torch.cat([pre, cell]).expand(b, n)
        size = signals.size.new_zeros(b, prefix + m, 1)
        size = size.scatter_add(1, assign[..., None], signals.size)  # sizes add up per cell
        index = torch.cat([pre, torch.full((m,), -1, device=dev)]).expand(b, -1)
        return Reduction(
            x=torch.cat([x[:, :prefix], compressed], dim=1), size=size, index=index, assign=assign
        )
