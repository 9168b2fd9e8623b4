"""PVC: progressive encoding across frames in the ViT, then 64 tokens a frame (provisional).

Paper: "PVC: Progressive Visual Token Compression for Unified Image and Video Processing in
Large Vision-Language Models", https://arxiv.org/abs/2412.09613
Official code: https://github.com/OpenGVLab/PVC (at 3a031d2 only the README, the evaluation
scripts and ``utils/preprocess.py``); the model (``PVCInternVLConfig``, the vision model
``InternVisionTemporalModel`` when ``use_temporal``) is remote code of the Hugging Face repo
OpenGVLab/PVC-InternVL2-8B, which could not be read here.

PROVISIONAL: written from the paper's method as its summaries give it (Sec. 3), on the
InternVL2-8B it fine-tunes (InternViT-300M, 1024 wide, 24 layers, 448 px / 14 px patches;
InternLM2.5-7B, 4096).

Algorithm:
1. Every input is a video: an image is repeated ``T_img = 4`` times (a static video).
2. Progressive encoding (``ProgressiveEncoding``): in the last ``L`` ViT layers a causal temporal
   multi-head attention (T-MHA) lets each token attend to the tokens at its spatial position in
   the same and earlier frames; the frame's relative timestamp, through a 256-wide sinusoidal
   embedding and an MLP (TE), conditions AdaLN in those layers, so later copies of a static
   image can encode what the earlier ones missed.
3. Adaptive compression (``PVC``): each frame's 32 x 32 patches are pixel-shuffled to 8 x 8 and
   mapped by InternVL's ``mlp1``: 64 tokens a frame, 4 x 64 = 256 for an image tile (as many as
   InternVL2 gives a tile).

Guessed (the paper's text beyond its summaries, and the official model code, were not read):
- 1024 -> 64 by one pixel shuffle of ratio 1/4 (``downsample_ratio=0.25``: ``mlp1`` takes
  16 * 1024 channels), InternVL's own mechanism at the ratio that gives 64; not a ratio-1/2
  shuffle followed by a further pooling (``mlp_add_ops`` of the official config is None by
  default). ``ps_version="v2"``, InternVL2-8B's (the config class defaults to ``"v1"``).
- T-MHA: ``qkv`` and ``proj`` linears as InternViT's attention, the ViT's head count, over every
  token (CLS included), before the layer's spatial attention: ``x += g_t * T-MHA(mod(LN(x)))``,
  then ``x += MHA(mod(norm1(x)))`` and ``x += FFN(mod(norm2(x)))`` (layer scales kept),
  ``mod(h) = h * (1 + scale) + shift``, ``LN`` affine-free. No temporal position embedding
  besides the causal order and the AdaLN condition.
- ``L = 4`` layers; one TE (DiT's ``TimestepEmbedder``: 256 -> C -> C, SiLU) shared by them,
  and one ``adaLN_modulation`` (SiLU, Linear C -> 7C) per layer. Zero-initialised as in DiT's
  adaLN-Zero, but gating only the new T-MHA branch: shift, scale and gate start at 0, so the
  untrained module leaves the pretrained ViT unchanged (the paper fine-tunes InternVL2).
- Timestamps: the frame index (0, 1, ..., T - 1) unless the caller gives others (e.g. seconds
  from the first sampled frame); the sinusoid is DiT's (max period 10000).
- Parameter names are ours: released weights do not load. The counts pinned in the tests
  (83,927,040 for ``PVC()``, 47,495,168 for ``ProgressiveEncoding()``) are ours, not official.

Conventions: video features ``[B, T * N, C]`` frame after frame, ``signals.grid`` the grid of
ONE frame, ``signals.state["frames"] = T`` (``reference.llama_vid``); without ``"frames"`` the
input is an image, compressed once and repeated ``image_frames`` times (what the static video
gives when the ViT has no, or an untrained, progressive encoding in front of the projector).
The LLaVA host runs its own vision tower, so ``ProgressiveEncoding`` runs on a ViT's blocks
outside it (``reference.hosts.vit`` blocks or InternViT-style ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.hosts.vit import Attention as HostAttention
from reference.internvl_1_5 import InternVL15
from reference.projector import ProjectorSignals
from reference.registry import register


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """DiT's sinusoidal embedding of ``t [...]`` -> ``[..., dim]`` (cosines, then sines)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


def causal_temporal_attention(qkv: Tensor, heads: int) -> Tensor:
    """T-MHA core: ``qkv [B, T, S, 3C]`` -> ``[B, T, S, C]``; the token at spatial position ``s``
    of frame ``t`` attends the tokens at ``s`` of frames ``0..t``."""
    b, t, s, c3 = qkv.shape
    qkv = qkv.permute(0, 2, 1, 3).reshape(b * s, t, 3, heads, c3 // (3 * heads))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B S, H, T, D]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, s, t, -1).transpose(1, 2)


class TemporalAttention(nn.Module):
    """Causal multi-head attention along the frames, one spatial position at a time."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T, S, C]`` -> ``[B, T, S, C]``."""
        return self.proj(causal_temporal_attention(self.qkv(x), self.num_heads))


class TemporalEmbedding(nn.Module):
    """TE: relative timestamps ``[B, T]`` -> ``[B, T, C]`` (sinusoid, then an MLP)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


def _modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return h * (1 + scale) + shift


def _spatial_attention(attn: nn.Module, h: Tensor) -> Tensor:
    out = attn(h, None, frozenset()) if isinstance(attn, HostAttention) else attn(h)
    return out[0] if isinstance(out, tuple) else out


def _scaled(block: nn.Module, name: str, h: Tensor) -> Tensor:
    scale = getattr(block, name, None)  # InternViT's layer scales ``ls1`` / ``ls2``
    return h if scale is None else h * scale


class ProgressiveLayer(nn.Module):
    """What PVC adds to one ViT layer: the T-MHA branch and the AdaLN modulation."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.norm_t = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.temporal_attn = TemporalAttention(dim, num_heads)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 7 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x: Tensor, cond: Tensor, block: nn.Module) -> Tensor:
        """``x [B, T, S, C]``, ``cond [B, T, C]``; ``block`` the ViT layer (``norm1``, ``attn``,
        ``norm2``, ``mlp``, optional ``ls1`` / ``ls2``), run on each frame as it is."""
        mods = self.adaLN_modulation(cond)[:, :, None].chunk(7, dim=-1)  # 7 x [B, T, 1, C]
        shift_t, scale_t, gate_t, shift_a, scale_a, shift_m, scale_m = mods
        x = x + gate_t * self.temporal_attn(_modulate(self.norm_t(x), shift_t, scale_t))
        b, t = x.shape[:2]
        h = _modulate(block.norm1(x), shift_a, scale_a).flatten(0, 1)  # '(b t) s c'
        x = x + _scaled(block, "ls1", _spatial_attention(block.attn, h)).unflatten(0, (b, t))
        h = _modulate(block.norm2(x), shift_m, scale_m)
        return x + _scaled(block, "ls2", block.mlp(h))


class ProgressiveEncoding(nn.Module):
    """T-MHA and AdaLN for the last ``num_layers`` layers of a ViT, with their shared TE.

    Defaults: InternViT-300M (1024 wide, 16 heads); ``num_layers=4`` is a guess.
    """

    def __init__(
        self, dim: int = 1024, num_heads: int = 16, num_layers: int = 4, freq_dim: int = 256
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must be >= 1 and divide dim={dim}, got {num_heads}")
        self.time_embed = TemporalEmbedding(dim, freq_dim)
        self.layers = nn.ModuleList(ProgressiveLayer(dim, num_heads) for _ in range(num_layers))

    def forward(
        self,
        x: Tensor,
        blocks: Sequence[nn.Module],
        frames: int,
        timestamps: Tensor | None = None,
    ) -> Tensor:
        """Run the ViT's last layers ``blocks`` with progressive encoding.

        Args:
            x: ``[B * T, S, C]``, the input of those layers, a sample's frames together
                (``'(b t) s c'``; ``S`` may include the CLS token).
            blocks: the ViT's last ``num_layers`` layers, in order.
            frames: ``T``.
            timestamps: ``[B, T]`` relative timestamps (None: the frame index).

        Returns:
            ``[B * T, S, C]``: the output of the last of ``blocks``.
        """
        if len(blocks) != len(self.layers):
            raise ValueError(f"blocks must be the last {len(self.layers)} ViT layers")
        if frames < 1 or x.shape[0] % frames:
            raise ValueError(f"frames must divide the {x.shape[0]} frames given, got {frames}")
        x = x.unflatten(0, (-1, frames))  # [B, T, S, C]
        if timestamps is None:
            timestamps = torch.arange(frames, device=x.device).expand(x.shape[0], -1)
        cond = self.time_embed(timestamps).to(x.dtype)  # [B, T, C]
        for layer, block in zip(self.layers, blocks, strict=True):
            x = layer(x, cond, block)
        return x.flatten(0, 1)


@register
class PVC(InternVL15):
    """Per-frame pixel shuffle and ``mlp1`` (64 tokens a 448 px frame); an image is a static
    video of ``image_frames`` frames."""

    catalog_id = "pvc"
    kind = "pixel-shuffle"
    basis = (
        "paper (provisional): official model code is only on the Hugging Face hub, not "
        "reachable here"
    )
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "downsample_ratio": 0.25},
    }
    invalid_configs = (
        ({"downsample_ratio": 0.4}, "downsample_ratio"),
        ({"downsample_ratio": 1.0}, "downsample_ratio"),
        ({"ps_version": "v3"}, "ps_version"),
        ({"image_frames": 0}, "image_frames"),
    )

    @classmethod
    def count_setting(cls, keep: int, n_image: int) -> dict | None:
        """An image gives ``4 * n_image / k^2`` tokens: 576 patches -> 64 at ``k = 6``,
        144 at ``k = 4``."""
        frames = 4
        k = math.isqrt(frames * n_image // keep) if keep and frames * n_image % keep == 0 else 0
        ok = k > 1 and k * k * keep == frames * n_image and math.isqrt(n_image) % k == 0
        return {"downsample_ratio": 1 / k} if ok else None

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        downsample_ratio: float = 0.25,
        ps_version: str = "v2",
        image_frames: int = 4,
    ):
        super().__init__(in_dim, out_dim, downsample_ratio, ps_version)
        if image_frames < 1:
            raise ValueError(f"image_frames must be >= 1, got {image_frames}")
        self.image_frames = image_frames

    def num_tokens(self, n: int, frames: int | None = None) -> int:
        """Tokens out for ``n`` patch tokens in: an image (``frames`` None) or ``frames``
        frames of ``n // frames`` patches."""
        if frames is None:
            return self.image_frames * super().num_tokens(n)
        return frames * super().num_tokens(n // frames)

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        frames = signals.state.get("frames")
        one = ProjectorSignals(grid=signals.grid)
        if frames is None:  # an image: the static video's frames, all alike here
            return super().forward(features, one).repeat(1, self.image_frames, 1)
        b, total, c = features.shape
        if frames < 1 or total % frames:
            raise ValueError(f"frames must divide the {total} tokens, got {frames}")
        out = super().forward(features.reshape(b * frames, total // frames, c), one)
        return out.reshape(b, -1, out.shape[-1])  # '(b t) m c -> b (t m) c'
