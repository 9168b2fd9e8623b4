"""VidCompress: a memory-enhanced compressor and a text-perceived Q-Former over video clips.

Paper: "VidCompress: Memory-Enhanced Temporal Compression for Video Understanding in Large
Language Models", https://arxiv.org/abs/2410.11417
Official code: none released.

PROVISIONAL: written from the paper's abstract and two third-party summaries of its method
(themoonlight.io and bohrium.com reviews); the paper's own text (sections, equations, settings)
could not be read here. Everything below the level of these sentences is a guess; see the list.

Algorithm (abstract and summaries):
1. The video is cut into fixed-size clips. A memory-enhanced compressor, a multiscale
   transformer, attends across the frames of a clip (short-term relations) and to a memory cache
   of the previous clips (long-term relations), and compresses the clip's tokens.
2. A text-perceived compressor, a Q-Former, turns each frame into a few query tokens; the
   temporal context (the compressor's tokens) enters the query embeddings by cross-attention.
3. A projection adapts the query tokens to the LLM ("token adaption").

Guessed (none of this is in the abstract or the summaries):
- Compressor: ``depth`` pre-norm blocks (MViT / MeMViT-like); the first pools its queries and
  residual 2 x 2 on each frame's grid (``pool``: the "multiscale"), so a clip leaves with
  ``clip_len * N / pool**2`` tokens; attention over the clip's tokens and the cache. The cache
  (MeMViT's): per block, the normalised, pooled inputs of the last ``memory_clips`` clips,
  detached (no gradient through the past). No extra position embeddings.
- Q-Former: BLIP-2's (``reference.blip2`` blocks; BERT-base, 32 queries, cross-attention every
  second layer) with the question in its self-attention, as InstructBLIP and LLaMA-VID
  (``reference.llama_vid.QFormerLayer``); the question arrives as embeddings
  ``state["text"]`` ``[B, L, text_dim]`` (``state["text_mask"]`` optional), mapped by
  ``text_proj``. The learned queries first cross-attend to their clip's compressed tokens
  (``temporal_attention``, a BERT cross-attention block), then the Q-Former attends to the frame
  (``ln_vision`` of its features, as BLIP-2). This order follows the abstract ("temporal contexts
  into query embeddings"); one summary reads the other way (frame first, then the memory).
- Output: ``num_query`` tokens per frame, frame after frame, via ``llm_proj`` (a linear map).
- Defaults: EVA ViT-g (1408) -> Vicuna-7B (4096), clips of 4 frames, 2 cached clips, depth 2,
  16 heads, ``text_dim`` = ``out_dim`` (the LLM's word embeddings). Parameter names are ours.
Conventions: video as ``reference.llama_vid`` (``[B, T * N, C]``, ``signals.grid`` one frame's,
``state["frames"] = T``, a multiple of ``clip_len``); an image (no ``"frames"``) is one clip
of one frame.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.blip2 import BertAttention
from reference.llama_vid import QFormerLayer
from reference.projector import Projector, ProjectorSignals
from reference.registry import register


def pool_frames(x: Tensor, grid: tuple[int, int], stride: int) -> Tensor:
    """Average-pool each frame of ``x [B, F * h * w, C]`` by ``stride``: ``[B, F * h' * w', C]``."""
    if stride == 1:
        return x
    b, _, c = x.shape
    h, w = grid
    cells = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)  # [B F, C, h, w]
    pooled = F.avg_pool2d(cells, stride)
    return pooled.permute(0, 2, 3, 1).reshape(b, -1, c)


class MemoryBlock(nn.Module):
    """Pre-norm block: (pooled) queries of the clip attend to the cache and the clip; MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, pool: int):
        super().__init__()
        self.heads, self.pool = heads, pool
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, grid: tuple[int, int], memory: Tensor | None):
        """``x [B, F * h * w, C]`` -> (``[B, F * h' * w', C]``, this clip's cache entry)."""
        y = self.norm1(x)
        yq, x = pool_frames(y, grid, self.pool), pool_frames(x, grid, self.pool)
        context = y if memory is None else torch.cat([memory, y], dim=1)
        q = self.q(yq).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, Lq, D]
        k, v = self.kv(context).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x)), yq.detach()


class MemoryCompressor(nn.Module):
    """Blocks run clip after clip; each keeps a FIFO cache of the last ``memory_clips`` clips."""

    def __init__(self, dim, depth, heads, mlp_ratio, pool, memory_clips):
        super().__init__()
        self.memory_clips, self.pool = memory_clips, pool
        self.blocks = nn.ModuleList(
            MemoryBlock(dim, heads, mlp_ratio, pool if i == 0 else 1) for i in range(depth)
        )

    def forward(self, clips: list[Tensor], grid: tuple[int, int]) -> list[Tensor]:
        """``clips``: ``[B, clip_len * N, C]`` each, in order; returns their compressed tokens."""
        caches: list[list[Tensor]] = [[] for _ in self.blocks]
        out = []
        for x in clips:
            g = grid
            for block, cache in zip(self.blocks, caches, strict=True):
                memory = torch.cat(cache, dim=1) if cache else None
                x, entry = block(x, g, memory)
                g = (g[0] // block.pool, g[1] // block.pool)
                if self.memory_clips > 0:
                    cache.append(entry)
                    del cache[: -self.memory_clips]
            out.append(x)
        return out


@register
class VidCompress(Projector):
    """Memory-enhanced clip compressor + text-perceived Q-Former with temporal query context."""

    catalog_id = "vidcompress"
    kind = "resampling"
    basis = "paper (provisional)"
    count_argument = "num_query"  # per frame
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {
            "in_dim": 32,
            "out_dim": 64,
            "num_query": 4,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "text_dim": 32,
            "memory_heads": 2,
        },
    }
    invalid_configs = (
        ({"num_query": 0}, "num_query"),
        ({"clip_len": 0}, "clip_len"),
        ({"memory_clips": -1}, "memory_clips"),
        ({"pool": 0}, "pool"),
        ({"depth": 0}, "depth"),
        ({"memory_heads": 3}, "memory_heads"),
        ({"num_attention_heads": 3}, "num_attention_heads"),
    )

    def __init__(
        self,
        in_dim: int = 1408,
        out_dim: int = 4096,
        num_query: int = 32,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_freq: int = 2,
        text_dim: int | None = None,
        clip_len: int = 4,
        memory_clips: int = 2,
        depth: int = 2,
        memory_heads: int = 16,
        pool: int = 2,
        mlp_ratio: float = 4.0,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
    ):
        super().__init__()
        checks = (("num_query", num_query, 1), ("clip_len", clip_len, 1), ("pool", pool, 1))
        for name, value, low in (*checks, ("memory_clips", memory_clips, 0), ("depth", depth, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        for name, heads, width in (
            ("memory_heads", memory_heads, in_dim),
            ("num_attention_heads", num_attention_heads, hidden_size),
        ):
            if heads < 1 or width % heads:
                raise ValueError(f"{name} must be a divisor of the width {width}, got {heads}")
        self.num_query, self.clip_len, self.pool = num_query, clip_len, pool
        self.memory_compressor = MemoryCompressor(
            in_dim, depth, memory_heads, mlp_ratio, pool, memory_clips
        )
        self.query_tokens = nn.Parameter(0.02 * torch.randn(1, num_query, hidden_size))
        self.temporal_attention = BertAttention(
            hidden_size, num_attention_heads, in_dim, layer_norm_eps, dropout
        )
        self.text_proj = nn.Linear(out_dim if text_dim is None else text_dim, hidden_size)
        self.ln_vision = nn.LayerNorm(in_dim)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.Qformer = nn.ModuleList(
            QFormerLayer(
                hidden_size,
                num_attention_heads,
                intermediate_size,
                in_dim,
                i % cross_attention_freq == 0,
                layer_norm_eps,
                dropout,
            )
            for i in range(num_hidden_layers)
        )
        self.llm_proj = nn.Linear(hidden_size, out_dim)

    def num_tokens(self, n: int, frames: int = 1) -> int:
        return frames * self.num_query

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        b, total, c = features.shape
        frames = int(signals.state.get("frames", 1))
        if frames < 1 or total % frames:
            raise ValueError(f"frames must divide the {total} tokens, got {frames}")
        clip_len = self.clip_len if "frames" in signals.state else 1  # an image: one frame
        if frames % clip_len:
            raise ValueError(f"frames must be a multiple of clip_len={clip_len}, got {frames}")
        n = total // frames
        h, w = signals.grid
        if h * w != n:
            h = w = math.isqrt(n)
        if h * w != n or h % self.pool or w % self.pool:
            raise ValueError(f"pool must divide the frame's grid ({h}, {w}) of {n} tokens")
        if self.num_query > n:
            raise ValueError(f"num_query must be at most the {n} tokens of a frame")
        clips = list(features.split(clip_len * n, dim=1))
        context = torch.stack(self.memory_compressor(clips, (h, w)), dim=1)  # [B, K, L, C]
        context = context.repeat_interleave(clip_len, dim=1).flatten(0, 1)  # [B T, L, C]
        queries = self.query_tokens.repeat(b * frames, 1, 1)  # not a view: hooks may see it
        queries = self.temporal_attention(queries, context)
        text, mask = signals.state.get("text"), signals.state.get("text_mask")
        if text is None:
            text = queries.new_zeros(b, 0, self.text_proj.in_features)
        text = self.text_proj(text.to(queries.dtype)).repeat_interleave(frames, dim=0)
        x = self.LayerNorm(torch.cat([queries, text], dim=1))
        keep = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
        if mask is not None:
            keep[:, self.num_query :] = mask.to(x.dtype).repeat_interleave(frames, dim=0)
        bias = ((1.0 - keep) * -10000.0)[:, None, None, :]  # BERT's additive mask
        image = self.ln_vision(features.reshape(b * frames, n, c))
        for layer in self.Qformer:
            x = layer(x, bias, image, self.num_query)
        out = self.llm_proj(x[:, : self.num_query])  # [B T, num_query, out_dim]
        return out.reshape(b, frames * self.num_query, -1)
