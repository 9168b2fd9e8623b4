"""Honeybee's C-Abstractor (convolutional blocks around adaptive pooling) and D-Abstractor.

Paper: "Honeybee: Locality-enhanced Projector for Multimodal LLM",
https://arxiv.org/abs/2312.06742
Official code: https://github.com/kakaobrain/honeybee, ``honeybee/projectors/projectors.py``,
class ``CAbstractor`` (its RegNet blocks are timm 0.9.8's ``RegStage`` / ``Bottleneck``), and
``honeybee/projectors/dabs.py``, class ``DAbstractor`` (below, with its own notes).

Algorithm (Sec. 3.2, Fig. 4a):
1. Add a learned position embedding to the ``N`` patch features and lay them out on
   their 2-D grid.
2. ``depth`` RegNet bottleneck blocks (1x1 conv, depthwise 3x3 conv, squeeze-excite,
   1x1 conv, residual) model local context at full resolution.
3. Adaptive average pooling shrinks the grid to ``sqrt(M) x sqrt(M)`` cells (``M`` =
   ``num_query_tokens``, any square, independent of ``N``); ``depth`` more blocks refine it.
4. An MLP (``mlp_depth`` linear layers, SiLU between) maps each cell to the LLM's width.

Weights: the parameter names are the official module's (``pos_emb``, ``net.0.b1.conv1.conv
.weight``, ``net.2.b3.se.fc1.bias``, ``readout.0.weight``, ...); a released Honeybee
checkpoint loads after stripping its ``abstractor.`` prefix. A ``pos_emb`` with one extra
(CLS) position, from older checkpoints, loses its first row on load, as the official
``_load_from_state_dict`` does.

Deviations from the official code:
- timm's ``RegStage``, ``ConvNormAct``, ``LayerNormAct2d`` and ``SEModule`` are written out
  here at the configuration Honeybee uses (stride 1, dilation 1, bottle_ratio 1, group
  size 1, SE ratio 0.25 of the block's input width, SiLU, channel LayerNorm with eps 1e-5),
  with timm's parameter names; timm is not a dependency.
- The position embedding is added out of place (the official ``x += pos_emb`` writes into
  the caller's tensor). The grid comes from ``signals.grid`` when it matches ``N`` (the
  official code takes ``sqrt(N)``); ``N`` must equal ``num_input_tokens`` (the official
  addition fails otherwise).
- ``num_query_tokens`` above ``num_input_tokens`` (adaptive pooling that upsamples) is a
  ValueError: it is not a reduction.
- Initialisation follows ``HoneybeePreTrainedModel._init_weights`` (convs and linears
  N(0, 0.02), zero biases), which the official model applies after construction.
- The D-Abstractor is a second class, not registered (the catalog id names one method); the
  registry's ``honeybee`` is the C-Abstractor, the paper's main projector.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (timm's ``LayerNormAct2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return x.permute(0, 3, 1, 2)


class ConvNormAct(nn.Module):
    """Bias-free conv, channel LayerNorm, optional SiLU (timm's ``ConvNormAct``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
        self.bn = LayerNorm2d(cout, eps=1e-5)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class SEModule(nn.Module):
    """Squeeze-excite: channel gates from the globally pooled map."""

    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))  # [B, C, 1, 1]
        return x * gate.sigmoid()


class Bottleneck(nn.Module):
    """timm's RegNet ``Bottleneck`` as Honeybee builds it (SE after the depthwise conv)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout)
        self.conv2 = ConvNormAct(cout, cout, kernel=3, groups=cout)  # group size 1: depthwise
        self.se = SEModule(cout, round(cin * 0.25))  # timm sizes SE by the input width
        self.conv3 = ConvNormAct(cout, cout, act=False)
        # The shortcut is a 1x1 conv + norm only where the width changes.
        self.downsample = ConvNormAct(cin, cout, act=False) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return F.silu(y + self.downsample(x))


def reg_stage(depth: int, cin: int, cout: int) -> nn.Sequential:
    """``depth`` bottlenecks named ``b1 .. b<depth>`` (timm's ``RegStage``, stride 1)."""
    blocks = [(f"b{i + 1}", Bottleneck(cin if i == 0 else cout, cout)) for i in range(depth)]
    return nn.Sequential(OrderedDict(blocks))


@register
class CAbstractor(Projector):
    """RegNet blocks, adaptive average pooling to ``num_query_tokens`` cells, RegNet blocks, MLP."""

    catalog_id = "honeybee"
    kind = "convolutional-downsampling"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {
            "in_dim": 32,
            "out_dim": 64,
            "num_input_tokens": 16,
            "num_query_tokens": 4,
            "hidden_size": 32,
            "depth": 1,
        },
    }
    invalid_configs = (
        ({"num_query_tokens": 10}, "num_query_tokens"),
        ({"num_query_tokens": 25}, "num_query_tokens"),
        ({"depth": -1}, "depth"),
        ({"mlp_depth": 0}, "mlp_depth"),
    )

    @classmethod
    def count_setting(cls, keep: int, n_image: int) -> dict | None:
        return {"num_input_tokens": n_image, "num_query_tokens": keep}

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        num_input_tokens: int = 256,
        num_query_tokens: int = 144,
        hidden_size: int = 1024,
        depth: int = 3,
        mlp_depth: int = 2,
        pos_emb: bool = True,
        prenorm: bool = False,
        num_eos_tokens: int = 0,
    ):
        """Defaults: Honeybee-C-7B-M144 (CLIP ViT-L/14 at 224 px: 256 patches of width 1024;
        Vicuna-7B: 4096; ``configs/model_config/c-abs.yaml``). ``in_dim`` and ``out_dim`` are
        the official ``encoder_hidden_size`` and ``output_hidden_size``."""
        super().__init__()
        side = math.isqrt(num_query_tokens) if num_query_tokens > 0 else 0
        if side < 1 or side * side != num_query_tokens:
            raise ValueError(f"num_query_tokens must be a positive square, got {num_query_tokens}")
        if num_query_tokens > num_input_tokens:
            raise ValueError(
                f"num_query_tokens must be <= num_input_tokens ({num_input_tokens}), "
                f"got {num_query_tokens}"
            )
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if mlp_depth < 1:
            raise ValueError(f"mlp_depth must be >= 1, got {mlp_depth}")
        if num_eos_tokens < 0:
            raise ValueError(f"num_eos_tokens must be >= 0, got {num_eos_tokens}")
        self.num_input_tokens, self.num_query_tokens, self.side = (
            num_input_tokens,
            num_query_tokens,
            side,
        )
        self.num_eos_tokens = num_eos_tokens
        self.eos_tokens = (
            nn.Parameter(nn.init.trunc_normal_(torch.empty(1, num_eos_tokens, out_dim), std=0.02))
            if num_eos_tokens
            else None
        )
        self.pos_emb = (
            nn.Parameter(nn.init.trunc_normal_(torch.empty(1, num_input_tokens, in_dim), std=0.02))
            if pos_emb
            else None
        )
        self.prenorm = nn.LayerNorm(in_dim, eps=1e-6) if prenorm else None
        sampler = nn.AdaptiveAvgPool2d((side, side))
        if depth:
            self.net = nn.Sequential(
                reg_stage(depth, in_dim, hidden_size),
                sampler,
                reg_stage(depth, hidden_size, hidden_size),
            )
        else:
            self.net, hidden_size = sampler, in_dim
        layers: list[nn.Module] = [nn.Linear(hidden_size, out_dim)]
        for _ in range(1, mlp_depth):
            layers += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
        self.readout = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def num_tokens(self, n: int) -> int:
        return self.num_query_tokens + self.num_eos_tokens

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        """``[B, N, in_dim]`` -> ``[B, num_query_tokens + num_eos_tokens, out_dim]``."""
        b, n, c = features.shape
        if n != self.num_input_tokens:
            raise ValueError(
                f"got {n} patch tokens; this C-Abstractor takes {self.num_input_tokens}"
            )
        h, w = signals.grid if signals.grid[0] * signals.grid[1] == n else (math.isqrt(n),) * 2
        if h * w != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        x = features if self.prenorm is None else self.prenorm(features)
        if self.pos_emb is not None:
            x = x + self.pos_emb
        x = self.net(x.transpose(1, 2).reshape(b, c, h, w))  # [B, hidden, side, side]
        x = self.readout(x.flatten(2).transpose(1, 2))  # [B, M, out_dim]
        if self.eos_tokens is not None:
            x = torch.cat([x, self.eos_tokens.expand(b, -1, -1)], dim=1)
        return x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Older official checkpoints keep a CLS position first; drop it as the official code does.
        key = prefix + "pos_emb"
        old = self.pos_emb is not None and key in state_dict
        if old and state_dict[key].shape[1] == self.pos_emb.shape[1] + 1:
            state_dict[key] = state_dict[key][:, 1:]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# -- D-Abstractor --------------------------------------------------------------------------------


def deformable_attention(
    value: Tensor, grid: tuple[int, int], locations: Tensor, weights: Tensor
) -> Tensor:
    """Single-level deformable attention (Deformable DETR, Eq. 2), PyTorch path.

    Args:
        value: ``[B, N, H, D]`` per-head values of the ``N = h * w`` grid.
        locations: ``[B, Q, H, P, 2]`` sampling points, ``(x, y)`` in ``[0, 1]``.
        weights: ``[B, Q, H, P]`` attention over each head's ``P`` points.
    Returns:
        ``[B, Q, H * D]``: bilinear samples (zero outside the grid), weighted and summed.
    """
    b, _, heads, d = value.shape
    q, p = locations.shape[1], locations.shape[3]
    v = value.permute(0, 2, 3, 1).reshape(b * heads, d, *grid)
    where = (2 * locations - 1).transpose(1, 2).flatten(0, 1)  # [B * H, Q, P, 2]
    samples = F.grid_sample(v, where, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = (samples * weights.transpose(1, 2).reshape(b * heads, 1, q, p)).sum(-1)  # [B*H, D, Q]
    return out.view(b, heads * d, q).transpose(1, 2)


class MultiscaleDeformableAttention(nn.Module):
    """Hugging Face's ``DeformableDetrMultiscaleDeformableAttention`` at one feature level."""

    def __init__(self, d_model: int, heads: int, points: int):
        super().__init__()
        self.heads, self.points = heads, points
        self.sampling_offsets = nn.Linear(d_model, heads * points * 2)
        self.attention_weights = nn.Linear(d_model, heads * points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        # Deformable DETR's init: head h's points start on a ray at angle 2*pi*h/H, k steps out.
        theta = torch.arange(heads) * (2 * math.pi / heads)
        ray = torch.stack([theta.cos(), theta.sin()], -1)
        ray = ray / ray.abs().amax(-1, keepdim=True)
        steps = torch.arange(1, points + 1, dtype=ray.dtype)[None, :, None]
        with torch.no_grad():
            nn.init.zeros_(self.sampling_offsets.weight)
            self.sampling_offsets.bias.copy_((ray[:, None] * steps).flatten())
            nn.init.zeros_(self.attention_weights.weight)
            nn.init.zeros_(self.attention_weights.bias)
            for lin in (self.value_proj, self.output_proj):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, memory: Tensor, ref: Tensor, grid: tuple[int, int]) -> Tensor:
        """Queries ``x [B, Q, C]`` sample ``memory [B, N, C]`` near ``ref [B, Q, 2]``."""
        b, q, c = x.shape
        value = self.value_proj(memory).view(b, memory.shape[1], self.heads, c // self.heads)
        offsets = self.sampling_offsets(x).view(b, q, self.heads, self.points, 2)
        weights = self.attention_weights(x).view(b, q, self.heads, self.points).softmax(-1)
        scale = torch.tensor([grid[1], grid[0]], dtype=x.dtype, device=x.device)  # offsets in cells
        locations = ref[:, :, None, None, :] + offsets / scale
        return self.output_proj(deformable_attention(value, grid, locations, weights))


class SelfAttention(nn.Module):
    """``DeformableDetrMultiheadAttention``: queries and keys get the position, values do not."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj, self.v_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.q_proj, self.out_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        b, q, c = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, q, self.heads, c // self.heads).transpose(1, 2)  # [B, H, Q, D]

        out = F.scaled_dot_product_attention(
            split(self.q_proj(x + pos)), split(self.k_proj(x + pos)), split(self.v_proj(x))
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, q, c))


class DecoderLayer(nn.Module):
    """``DeformableDetrDecoderLayer``: self-attention, deformable cross-attention, ReLU FFN
    (post-norm, dropout on each residual branch)."""

    def __init__(self, d_model: int, heads: int, points: int, ffn: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.self_attn = SelfAttention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = MultiscaleDeformableAttention(d_model, heads, points)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1, self.fc2 = nn.Linear(d_model, ffn), nn.Linear(ffn, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x, pos, memory, ref, grid):
        def drop(t: Tensor) -> Tensor:
            return F.dropout(t, self.dropout, self.training)

        x = self.self_attn_layer_norm(x + drop(self.self_attn(x, pos)))
        x = self.encoder_attn_layer_norm(x + drop(self.encoder_attn(x + pos, memory, ref, grid)))
        return self.final_layer_norm(x + drop(self.fc2(F.relu(self.fc1(x)))))


class DAbstractor(Projector):
    """Honeybee's D-Abstractor: deformable attention around learned reference points
    (Sec. 3.2, Fig. 4b).

    Algorithm: project the features (``input_proj``) and add ``v_pos_emb``; pool them
    adaptively to ``num_queries`` cells, the queries' position embeddings, with learned content
    (``pooled_v_target="query"``; ``"tgt"`` swaps the roles, ``"none"`` learns both); run
    ``decoder_layers`` Deformable DETR decoder layers (self-attention, then each head samples
    ``decoder_n_points`` bilinear points around the query's reference point, softmax-weighted,
    then an FFN); append ``eos_tokens``; a linear layer maps to the LLM's width.

    Official: ``honeybee/projectors/dabs.py``, class ``DAbstractor`` (a subclass of Hugging
    Face's ``DeformableDetrDecoder``, transformers 4.38.1), ``configs/model_config/d-abs.yaml``.
    Names as there (``layers.0.encoder_attn.sampling_offsets.weight``, ``reference_points``,
    ``v_pos_emb``, ``query_position_embeddings.weight``, ``output_proj.weight``; a checkpoint
    loads after stripping ``abstractor.``). Not registered: the catalog id ``honeybee`` is the
    C-Abstractor's. Deviations: one feature level only (the official multi-level option cannot
    be combined with its pooled queries); no custom CUDA kernel (the official falls back to
    the same PyTorch path); runs in the input's dtype (the official casts to float32);
    initialisation is Deformable DETR's for the attention and N(0, 0.02) elsewhere (the official
    model's initialisation passes through two ``post_init`` calls, not reproduced).
    """

    catalog_id = "honeybee"
    kind = "convolutional-downsampling"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {
            "in_dim": 32,
            "out_dim": 64,
            "num_input_tokens": 16,
            "num_queries": 4,
            "d_model": 32,
            "decoder_layers": 1,
            "decoder_ffn_dim": 32,
        },
    }
    invalid_configs = (
        ({"num_queries": 10}, "num_queries"),
        ({"num_queries": 25}, "num_queries"),
        ({"decoder_attention_heads": 5}, "decoder_attention_heads"),
        ({"pooled_v_target": "key"}, "pooled_v_target"),
    )

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        num_input_tokens: int = 256,
        num_queries: int = 144,
        d_model: int = 1024,
        decoder_layers: int = 6,
        decoder_attention_heads: int = 8,
        decoder_n_points: int = 4,
        decoder_ffn_dim: int = 1024,
        dropout: float = 0.1,
        pooled_v_target: str = "query",
        pos_emb: bool = True,
        num_eos_tokens: int = 0,
    ):
        """Defaults: Honeybee-D-7B-M144 (d-abs.yaml; Deformable DETR's decoder defaults)."""
        super().__init__()
        side = math.isqrt(num_queries) if num_queries > 0 else 0
        if side < 1 or side * side != num_queries or num_queries > num_input_tokens:
            raise ValueError(
                f"num_queries must be a positive square <= num_input_tokens ({num_input_tokens}), "
                f"got {num_queries}"
            )
        if d_model % decoder_attention_heads:
            raise ValueError(
                f"decoder_attention_heads must be a divisor of d_model ({d_model}), "
                f"got {decoder_attention_heads}"
            )
        if pooled_v_target not in ("query", "tgt", "none"):
            raise ValueError(
                f"pooled_v_target must be one of query, tgt, none, got {pooled_v_target!r}"
            )
        self.num_input_tokens, self.num_queries, self.side = num_input_tokens, num_queries, side
        self.pooled_v_target, self.num_eos_tokens = pooled_v_target, num_eos_tokens
        self.layers = nn.ModuleList(
            DecoderLayer(
                d_model, decoder_attention_heads, decoder_n_points, decoder_ffn_dim, dropout
            )
            for _ in range(decoder_layers)
        )
        self.input_proj = nn.ModuleList(
            [nn.Linear(in_dim, d_model) if in_dim != d_model else nn.Identity()]
        )
        width = d_model if pooled_v_target != "none" else 2 * d_model  # "none": position + target
        self.query_position_embeddings = nn.Embedding(num_queries, width)
        # Reference points start on the centres of a side x side lattice over the input grid.
        hw = math.isqrt(num_input_tokens)
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, hw - 0.5, side), torch.linspace(0.5, hw - 0.5, side), indexing="ij"
        )
        self.reference_points = nn.Parameter(torch.stack([xs, ys], -1).reshape(1, -1, 2) / hw)
        self.eos_tokens = (
            nn.Parameter(nn.init.trunc_normal_(torch.empty(1, num_eos_tokens, d_model), std=0.02))
            if num_eos_tokens
            else None
        )
        self.v_pos_emb = (
            nn.Parameter(nn.init.trunc_normal_(torch.empty(1, num_input_tokens, d_model), std=0.02))
            if pos_emb
            else None
        )
        self.output_proj = nn.Linear(d_model, out_dim) if out_dim != d_model else nn.Identity()
        attn = {id(m) for layer in self.layers for m in layer.encoder_attn.children()}
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and id(m) not in attn:
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def num_tokens(self, n: int) -> int:
        return self.num_queries + self.num_eos_tokens

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        """``[B, N, in_dim]`` -> ``[B, num_queries + num_eos_tokens, out_dim]``."""
        b, n, _ = features.shape
        if n != self.num_input_tokens:
            raise ValueError(
                f"got {n} patch tokens; this D-Abstractor takes {self.num_input_tokens}"
            )
        grid = signals.grid if signals.grid[0] * signals.grid[1] == n else (math.isqrt(n),) * 2
        if grid[0] * grid[1] != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        memory = self.input_proj[0](features)
        if self.v_pos_emb is not None:
            memory = memory + self.v_pos_emb
        learned = self.query_position_embeddings.weight.unsqueeze(0).expand(b, -1, -1)
        if self.pooled_v_target == "none":
            pos, target = learned.chunk(2, dim=-1)
        else:
            pooled = F.adaptive_avg_pool2d(memory.transpose(1, 2).unflatten(2, grid), self.side)
            pooled = pooled.flatten(2).transpose(1, 2)  # [B, Q, d_model]
            pos, target = (
                (pooled, learned) if self.pooled_v_target == "query" else (learned, pooled)
            )
        ref = self.reference_points.expand(b, -1, -1)
        for layer in self.layers:
            target = layer(target, pos, memory, ref, grid)
        if self.eos_tokens is not None:
            target = torch.cat([target, self.eos_tokens.expand(b, -1, -1)], dim=1)
        return self.output_proj(target)
