"""mPLUG-DocOwl2: the H-Reducer, then the High-resolution DocCompressor.

Paper: "mPLUG-DocOwl2: High-resolution Compressing for OCR-free Multi-page Document
Understanding", https://arxiv.org/abs/2409.03420
Official code: https://huggingface.co/mPLUG/DocOwl2 (loaded with ``trust_remote_code``; the
``DocOwl2`` folder of https://github.com/X-PLUG/mPLUG-DocOwl holds no model code),
``visual_compressor.py``: ``MplugDocOwlHRDocCompressor``, fed by ``MplugDocOwlHReducerModel``
(``visual_encoder.py``; the same class is in the GitHub repository's
``DocOwl1.5/mplug_docowl/model/visual_encoder.py``). The Hugging Face files could not be
fetched here; the fixture ran the copy of ``visual_compressor.py`` in
https://github.com/engkimo/JAPANESE_DOC_LLM (its class prefix renamed back to ``MplugDocOwl``,
which gives the size of the ``MplugDocOwl``-named copy in https://github.com/Turtle-PB/-OwlLogics).

Algorithm (Sec. 3):
1. H-Reducer, on the global view and on every crop: a 1x4 convolution to 4x the width (GELU),
   those four vectors laid back side by side, a second 1x4 convolution, then a linear map to
   the LLM width: a 36x36 grid (504 px, ViT-L/14) becomes 36x9 = 324 tokens.
2. The crops' tokens are assembled into one high-resolution map; each global token's window is
   the ``R x C`` map tokens of its own region (``R x C`` crops).
3. ``layer`` (2) cross-attention layers: the global tokens (queries) attend only to their window
   (LayerNorm on both sides, residual on the normed query, a SwiGLU MLP with a LayerNorm
   inside); then a linear layer and one learned end token: 325 tokens per page, any crop count.

Deviations from the official code:
- One view per image in ``forward`` (the host's): it is the global view and its own 1x1 crop,
  as DocOwl's cropping gives for a 1x1 anchor; ``compress`` takes a global view and ``R x C``
  crops (the same crop grid for the whole batch; the official batch mixes grids).
- The per-crop column count comes from ``signals.grid`` (official: ``v2t_img_col_tokens``, fixed
  by the image size; the H-Reducer assumes a square ``sqrt(N)`` grid).
- Attention is plain PyTorch in the input's dtype (official: ``flash_attn_varlen_func``, fp16 or
  bf16 on CUDA only, one variable-length sequence per query).
- ``vision2text.ln_q`` and ``vision2text.vit_eos`` exist in the official module but do not reach
  its output (``ln_q`` is never called; the end token is cut by the compressor); they are buffers
  here, so the checkpoint's keys load and every parameter is trained; the test adds them to the
  count. Keys: the checkpoint's ``model.vision2text.*`` and ``model.hr_compressor.*`` load with
  ``model.`` removed.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


class _Frozen(nn.Module):
    """Holds official tensors that do not reach the output, as buffers under their names."""

    def __init__(self, **shapes: tuple[int, ...]):
        super().__init__()
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape))


class HReducer(nn.Module):
    """``MplugDocOwlHReducerModel``: two ``1 x k`` convolutions and ``visual_fc``."""

    def __init__(self, in_dim: int, out_dim: int, k: int):
        super().__init__()
        self.k = k
        self.ln_q = _Frozen(weight=(in_dim,), bias=(in_dim,))
        self.reducer_before = nn.Sequential(
            nn.Conv2d(in_dim, k * in_dim, (1, k), (1, k)), nn.GELU()
        )
        self.reducer = nn.Conv2d(in_dim, in_dim, (1, k), (1, k))
        self.visual_fc = nn.Linear(in_dim, out_dim)
        self.register_buffer("vit_eos", torch.zeros(1, 1, out_dim))

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[V, N, C_v]`` views on ``grid`` -> ``[V, h * w / k, out_dim]`` (row-major)."""
        v, _, c = x.shape
        h, w = grid
        y = self.reducer_before(x.transpose(1, 2).reshape(v, c, h, w))  # [V, k C, h, w / k]
        # 'B (X D) H W -> B D H (W X)': the k vectors of a position go back side by side
        y = y.view(v, self.k, c, h, w // self.k).permute(0, 2, 3, 4, 1).reshape(v, c, h, w)
        return self.visual_fc(self.reducer(y).flatten(2).transpose(1, 2))


class SwiGLU(nn.Module):
    """``MplugDocOwlVisualMLP``: ``w2(ffn_ln(silu(w1 x) * w3 x))``, width rounded up to 256."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        hidden = 256 * ((int(8 * dim / 3) + 255) // 256)
        self.w1, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)
        self.ffn_ln = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        """``q [B, G, D]`` attends to its own window ``kv [B, G, K, D]``."""
        b, g, k, d = kv.shape
        query = self.query(q).view(b, g, self.heads, 1, -1)
        key, value = (
            f(kv).view(b, g, k, self.heads, -1).transpose(2, 3) for f in (self.key, self.value)
        )  # [B, G, H, K, D / H]
        out = F.scaled_dot_product_attention(query, key, value)  # [B, G, H, 1, D / H]
        return out.reshape(b, g, d)


class _Output(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.out_proj, self.norm2, self.mlp = (
            nn.Linear(dim, dim),
            nn.LayerNorm(dim),
            SwiGLU(dim, eps),
        )

    def forward(self, attended: Tensor, query: Tensor) -> Tensor:
        x = query + self.out_proj(attended)
        return x + self.mlp(self.norm2(x))


class CrossAttentionLayer(nn.Module):
    """``MplugDocOwlVisualCrossAttentionLayer`` (the residual starts from the normed query)."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.attention, self.output = _Attention(dim, heads), _Output(dim, eps)
        self.norm1, self.normk = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        q = self.norm1(q)
        return self.output(self.attention(q, self.normk(kv)), q)


class _Layers(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float, layer: int):
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, heads, eps) for _ in range(layer))


class HRDocCompressor(nn.Module):
    """``MplugDocOwlHRDocCompressor``: windowed cross-attention, ``compressor_fc``, end token."""

    def __init__(self, dim: int, heads: int, layer: int, eps: float):
        super().__init__()
        self.compressor_crossatt = _Layers(dim, heads, eps, layer)
        self.compressor_fc = nn.Linear(dim, dim)
        self.compressor_eos = nn.Parameter(torch.randn(1, 1, dim))

    def forward(self, glob: Tensor, windows: Tensor) -> Tensor:
        """``glob [B, G, D]``, ``windows [B, G, R C, D]`` -> ``[B, G + 1, D]``."""
        for layer in self.compressor_crossatt.layers:
            glob = layer(glob, windows)  # every layer reads the raw crop tokens
        out = self.compressor_fc(glob)
        return torch.cat([out, self.compressor_eos.to(out.dtype).expand(len(out), -1, -1)], 1)


def crop_windows(crops: Tensor, crop_grid: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Each global position's window of the assembled crop map.

    Args:
        crops: ``[B, R * C, h * w, D]``, crops row-major, tokens row-major on ``grid = (h, w)``.
        crop_grid: ``(R, C)``.

    Returns:
        ``[B, h * w, R * C, D]``: map rows ``i R .. i R + R - 1`` and columns ``j C .. j C + C - 1``
        for the global token ``(i, j)``.
    """
    (r, c), (h, w) = crop_grid, grid
    b, d = crops.shape[0], crops.shape[-1]
    big = crops.view(b, r, c, h, w, d).permute(0, 1, 3, 2, 4, 5).reshape(b, r * h, c * w, d)
    return big.view(b, h, r, w, c, d).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, r * c, d)


@register
class DocOwl2(Projector):
    """H-Reducer (``vision2text``) and High-resolution DocCompressor (``hr_compressor``)."""

    catalog_id = "docowl2"
    kind = "convolutional-downsampling"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "high_reso_cross_num_att_heads": 4},
    }
    invalid_configs = (
        ({"conv_shape": "2x2"}, "conv_shape"),
        ({"conv_shape": "1x0"}, "conv_shape"),
        ({"high_reso_cross_num_att_heads": 5}, "high_reso_cross_num_att_heads"),
        ({"layer": 0}, "layer"),
    )

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        conv_shape: str = "1x4",
        layer: int = 2,
        high_reso_cross_num_att_heads: int = 16,
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__()
        rows, _, cols = conv_shape.partition("x")
        if rows != "1" or not cols.isdigit() or int(cols) < 1:
            raise ValueError(
                f"conv_shape must be '1xK' (the horizontal reducer; the compressor assumes one "
                f"row), got {conv_shape!r}"
            )
        heads = high_reso_cross_num_att_heads
        if heads < 1 or out_dim % heads:
            raise ValueError(
                f"high_reso_cross_num_att_heads must be >= 1 and divide out_dim={out_dim}, "
                f"got {heads}"
            )
        if layer < 1:
            raise ValueError(f"layer must be >= 1, got {layer}")
        self.k = int(cols)
        self.vision2text = HReducer(in_dim, out_dim, self.k)
        self.hr_compressor = HRDocCompressor(out_dim, heads, layer, layer_norm_eps)

    def num_tokens(self, n: int) -> int:
        return n // self.k + 1

    def _grid(self, n: int, grid: tuple[int, int]) -> tuple[int, int]:
        h, w = grid if grid[0] * grid[1] == n else (int(n**0.5),) * 2
        if h * w != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        if w % self.k:
            raise ValueError(f"conv_shape must divide the grid width: 1x{self.k} on {h}x{w}")
        return h, w

    def compress(
        self, glob: Tensor, crops: Tensor, crop_grid: tuple[int, int], grid: tuple[int, int]
    ) -> Tensor:
        """``glob [B, N, C_v]`` (the global view) and ``crops [B, R * C, N, C_v]`` on ``grid``
        -> ``[B, N / k + 1, out_dim]``."""
        n = glob.shape[1]
        h, w = self._grid(n, grid)
        if crops.shape[1] != crop_grid[0] * crop_grid[1]:
            raise ValueError(f"crop_grid must match the {crops.shape[1]} crops, got {crop_grid}")
        g = self.vision2text(glob, (h, w))
        c = self.vision2text(crops.flatten(0, 1), (h, w)).unflatten(0, crops.shape[:2])
        return self.hr_compressor(g, crop_windows(c, crop_grid, (h, w // self.k)))

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        h, w = self._grid(features.shape[1], signals.grid)
        g = self.vision2text(features, (h, w))  # the view is also its own 1x1 crop
        return self.hr_compressor(g, g.unsqueeze(2))
