"""FastVLM: FastViTHD, a hybrid vision encoder whose downsampling sets the visual token count.

Paper: "FastVLM: Efficient Vision Encoding for Vision Language Models",
https://arxiv.org/abs/2412.13303
Official code: https://github.com/apple/ml-fastvlm,
``llava/model/multimodal_encoder/mobileclip/mci.py`` (``FastViT`` as built by ``fastvithd()``,
wrapped by ``MCi``; the ``mobileclip_l_1024`` tower) and
``llava/model/multimodal_projector/builder.py`` (``mlp2x_gelu``).

Algorithm (Sec. 3):
1. A stride-4 convolutional stem, then five stages of widths 96..1536 and depths
   (2, 12, 24, 4, 2): three RepMixer stages (depthwise-conv token mixing), then two
   self-attention stages, each behind a 7x7 conditional positional encoding (RepCPE).
2. A stride-2 patch embedding (7x7 depthwise, then 1x1) between stages: total stride 64,
   so a 1024 px image gives a 16x16 map, 256 tokens (a ViT-L/14 at 1024 px would give 5329).
3. ``conv_exp`` (3x3 depthwise with squeeze-excite) doubles the width to 3072; the flattened
   map gives the visual tokens, which LLaVA's two-layer GELU MLP maps to the LLM width.
Defaults: that tower (``mobileclip_l_1024``) and ``out_dim=896`` (FastVLM-0.5B, Qwen2-0.5B;
1536 and 3584 for the 1.5B and 7B models). Nothing is pruned or merged: the reduction is
the encoder's downsampling, fixed by the image size.

Fit to the projector contract: FastVLM replaces the vision tower, not only the projector.
``FastViTHD`` takes images ``[B, 3, H, W]``. The registered ``FastVLM`` is FastViTHD plus the
MLP projector and reads its ``features`` as an image laid out as 1x1 patches:
``[B, H * W, in_dim]`` with ``signals.grid == (H, W)`` (``in_dim=3``: RGB; 1024**2 in -> 256
out). On the project's tiny LLaVA host it is fed the ViT's patch grid as a 32-channel image,
which only exercises the contract; it is not a setting of the paper.

Deviations from the official code:
- Only the reparameterised (inference) form, which ``fastvithd()`` builds
  (``inference_mode=True``) and the released checkpoints hold: each MobileOne block, RepMixer,
  RepCPE and large-kernel conv is one conv (``reparam_conv`` / ``lkb_reparam``); the
  train-time branches and ``reparameterize()`` are left out. Dropout and drop path (0 in the
  official setting) and the unused 1000-class ``nn.Linear`` (MCi replaces it) are left out.
- The stem takes ``in_dim`` channels (officially always 3); RepCPE sits in front of every
  attention stage (``fastvithd()`` gives it exactly those); the attention head width is 32.
- The MCi head (``head.proj``, 3072x768, the CLIP image embedding) is built by
  ``FastViTHD(projection_dim=768)`` (the official tower, 125,073,504 parameters) but not by
  ``FastVLM``, whose output never reads it; drop that key when loading a FastVLM checkpoint.
  Keys: ``model.vision_tower.vision_tower.model.<k>`` -> ``vision_tower.<k>`` and
  ``model.mm_projector.<k>`` -> ``mm_projector.<k>`` (``official_keys``).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register

HEAD_DIM = 32  # MHSA's head width; AttentionBlock never changes it
MIXERS = ("repmixer", "attention")


def token_grid(height: int, width: int, num_stages: int = 5) -> tuple[int, int]:
    """The output map of an ``height x width`` image: the stem halves twice, each stage
    boundary once more (every stride-2 conv pads k // 2, so a side ``s`` becomes ``ceil(s/2)``)."""
    for _ in range(2 + num_stages - 1):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


class SEBlock(nn.Module):
    """Squeeze-excite with a ReLU bottleneck of ``rd_ratio`` times the width."""

    def __init__(self, dim: int, rd_ratio: float = 0.0625):
        super().__init__()
        self.reduce = nn.Conv2d(dim, int(dim * rd_ratio), 1)
        self.expand = nn.Conv2d(int(dim * rd_ratio), dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class MobileOneBlock(nn.Module):
    """A reparameterised MobileOne block: one conv, optional squeeze-excite, GELU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, se=False):
        super().__init__()
        self.reparam_conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups)
        self.se = SEBlock(cout) if se else nn.Identity()
        self.activation = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.se(self.reparam_conv(x)))


class ReparamLargeKernelConv(nn.Module):
    """The reparameterised large-kernel depthwise conv of a patch embedding, then GELU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.lkb_reparam = nn.Conv2d(cin, cout, k, stride, k // 2, groups=cin)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.lkb_reparam(x))


class PatchEmbed(nn.Module):
    """Stride-2 downsampling between stages: large-kernel depthwise conv, then 1x1."""

    def __init__(self, cin: int, cout: int, k: int = 7):
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(cin, cout, k, 2), MobileOneBlock(cout, cout, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class DepthwiseReparam(nn.Module):
    """RepMixer (3x3) or RepCPE (7x7) after reparameterisation: one depthwise conv whose
    kernel already holds the skip connection."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.reparam_conv = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.reparam_conv(x)


class ConvFFN(nn.Module):
    """7x7 depthwise conv + BatchNorm, then a 1x1 GELU MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=False)
        self.conv = nn.Sequential(OrderedDict(conv=dw, bn=nn.BatchNorm2d(dim)))
        self.fc1, self.act, self.fc2 = (
            nn.Conv2d(dim, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, dim, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class LayerNormChannel(nn.Module):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = (
            nn.Parameter(torch.ones(dim)),
            nn.Parameter(torch.zeros(dim)),
            eps,
        )

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        x = (x - u) / torch.sqrt((x - u).pow(2).mean(1, keepdim=True) + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MHSA(nn.Module):
    """Multi-head self-attention over the ``H * W`` positions of a map."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(x.flatten(2).transpose(1, 2)).reshape(b, h * w, 3, self.heads, HEAD_DIM)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, N, D]
        attn = ((q * HEAD_DIM**-0.5) @ k.transpose(-2, -1)).softmax(-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(b, h * w, c))
        return out.transpose(1, 2).reshape(b, c, h, w)


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, kernel_size: int = 3):
        super().__init__()
        self.token_mixer = DepthwiseReparam(dim, kernel_size)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mixer(x)  # the residual is folded into the kernel
        return x + self.layer_scale * self.convffn(x)


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.norm, self.token_mixer = LayerNormChannel(dim), MHSA(dim)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(torch.full((dim, 1, 1), 1e-5))
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.layer_scale_1 * self.token_mixer(self.norm(x))
        return x + self.layer_scale_2 * self.convffn(x)


class GlobalPool2D(nn.Module):
    """MCi's head: spatial mean, then a linear map to the CLIP embedding."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.proj = nn.Parameter(dim**-0.5 * torch.randn(dim, out))

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3)) @ self.proj


class FastViTHD(nn.Module):
    """FastViTHD (``MCi('fastvithd')``'s ``model``): images ``[B, in_chans, H, W]`` to the map
    ``[B, cls_ratio * embed_dims[-1], ceil(H / 64), ceil(W / 64)]`` (five stages)."""

    def __init__(
        self,
        in_chans: int = 3,
        layers: tuple[int, ...] = (2, 12, 24, 4, 2),
        embed_dims: tuple[int, ...] = (96, 192, 384, 768, 1536),
        mlp_ratios: tuple[float, ...] = (4, 4, 4, 4, 4),
        token_mixers: tuple[str, ...] = ("repmixer",) * 3 + ("attention",) * 2,
        projection_dim: int | None = 768,
        cls_ratio: float = 2.0,
    ):
        super().__init__()
        s = len(layers)
        if s not in (4, 5) or min(layers) < 1:
            raise ValueError(f"layers must be 4 or 5 stage depths >= 1, got {layers}")
        if len(mlp_ratios) != s or min(mlp_ratios) <= 0:
            raise ValueError(f"mlp_ratios must be {s} positive ratios, got {mlp_ratios}")
        if len(token_mixers) != s or not set(token_mixers) <= set(MIXERS):
            raise ValueError(f"token_mixers must be {s} of {MIXERS}, got {token_mixers}")
        if len(embed_dims) != s or any(b % a for a, b in itertools.pairwise(embed_dims)):
            raise ValueError(
                f"embed_dims must be {s} widths, each dividing the next, got {embed_dims}"
            )
        if any(
            d % HEAD_DIM for d, m in zip(embed_dims, token_mixers, strict=True) if m == "attention"
        ):
            raise ValueError(f"embed_dims must be multiples of {HEAD_DIM} at attention stages")
        c0, c = embed_dims[0], embed_dims[-1]
        self.patch_embed = nn.Sequential(
            MobileOneBlock(in_chans, c0, 3, 2),
            MobileOneBlock(c0, c0, 3, 2, groups=c0),
            MobileOneBlock(c0, c0, 1),
        )
        network: list[nn.Module] = []
        for i, (depth, dim, ratio, mixer) in enumerate(
            zip(layers, embed_dims, mlp_ratios, token_mixers, strict=True)
        ):
            if mixer == "attention":
                network.append(DepthwiseReparam(dim, 7))  # RepCPE, conditional position encoding
                blocks = [AttentionBlock(dim, ratio) for _ in range(depth)]
            else:
                blocks = [RepMixerBlock(dim, ratio) for _ in range(depth)]
            network.append(nn.Sequential(*blocks))
            if i < s - 1:
                network.append(PatchEmbed(dim, embed_dims[i + 1]))
        self.network = nn.ModuleList(network)
        self.conv_exp = MobileOneBlock(c, int(c * cls_ratio), 3, groups=c, se=True)
        self.head = GlobalPool2D(int(c * cls_ratio), projection_dim) if projection_dim else None
        self.num_stages, self.out_dim = s, int(c * cls_ratio)

    def forward(self, images: Tensor) -> Tensor:
        """``image_embeddings`` ``[B, C_out, h, w]``, the map the VLM reads."""
        x = self.patch_embed(images)
        for module in self.network:
            x = module(x)
        return self.conv_exp(x)

    def embed(self, image_embeddings: Tensor) -> Tensor:
        """MCi's CLIP image embedding ``[B, projection_dim]`` (not used by FastVLM)."""
        return self.head(image_embeddings)


def official_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A FastVLM (LLaVA) checkpoint's vision tower and projector under ``FastVLM``'s names."""
    tower, proj = "model.vision_tower.vision_tower.model.", "model.mm_projector."
    out = {}
    for k, v in state_dict.items():
        if k.startswith(tower) and not k.startswith(tower + "head."):
            out["vision_tower." + k.removeprefix(tower)] = v
        elif k.startswith(proj):
            out["mm_projector." + k.removeprefix(proj)] = v
    return out


@register
class FastVLM(Projector):
    """FastViTHD on the image laid out as 1x1 patches, then LLaVA's MLP projector."""

    catalog_id = "fastvlm"
    takes = "pixels"
    kind = "convolutional-downsampling"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {
            "in_dim": 32,
            "out_dim": 64,
            "layers": (1,) * 5,
            "embed_dims": (8, 16, 16, 32, 32),
        },
    }
    invalid_configs = (
        ({"layers": (1, 1, 1)}, "layers"),
        ({"embed_dims": (8, 12, 16, 32, 32)}, "embed_dims"),
        ({"embed_dims": (8, 16, 16, 16, 48)}, "embed_dims"),
        ({"token_mixers": ("repmixer",) * 4 + ("pooling",)}, "token_mixers"),
        ({"mlp_ratios": (4, 4, 4, 4, 0)}, "mlp_ratios"),
        ({"mlp_depth": 0}, "mlp_depth"),
    )

    def __init__(
        self,
        in_dim: int = 3,
        out_dim: int = 896,
        layers: tuple[int, ...] = (2, 12, 24, 4, 2),
        embed_dims: tuple[int, ...] = (96, 192, 384, 768, 1536),
        mlp_ratios: tuple[float, ...] = (4, 4, 4, 4, 4),
        token_mixers: tuple[str, ...] = ("repmixer",) * 3 + ("attention",) * 2,
        mlp_depth: int = 2,
    ):
        super().__init__()
        if mlp_depth < 1:
            raise ValueError(f"mlp_depth must be >= 1, got {mlp_depth}")
        self.vision_tower = FastViTHD(in_dim, layers, embed_dims, mlp_ratios, token_mixers, None)
        modules: list[nn.Module] = [nn.Linear(self.vision_tower.out_dim, out_dim)]
        for _ in range(1, mlp_depth):
            modules += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.mm_projector = nn.Sequential(*modules)

    def num_tokens(self, n: int) -> int:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} pixels are not a square image; give signals.grid")
        h, w = token_grid(side, side, self.vision_tower.num_stages)
        return h * w

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        """The image pixel by pixel, ``[B, H * W, in_dim]`` -> ``[B, M, out_dim]``."""
        b, n, c = features.shape
        h, w = signals.grid
        if h * w != n:
            h = w = math.isqrt(n)
            if h * w != n:
                raise ValueError(f"{n} positions are not a square image; give signals.grid")
        image = features.transpose(1, 2).reshape(b, c, h, w)
        tokens = self.vision_tower(image).flatten(2).transpose(1, 2)  # [B, h' * w', C_out]
        return self.mm_projector(tokens)
