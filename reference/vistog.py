"""VisToG: visual token grouping with semantic tokens and isolated attention.

Paper: "Efficient Multi-modal Large Language Models via Visual Token Grouping",
https://arxiv.org/abs/2411.17773 (OpenReview ym1dS37mZE)
Official code: none released (none in the catalog entry or the paper's stored pages).

PROVISIONAL: written from the paper's abstract (the stored copies of the arXiv HTML end
after the abstract). Everything below the abstract's sentences is a guess; see the list.

Algorithm (abstract):
1. Learnable semantic tokens are concatenated to the patch tokens after the vision
   encoder's linear patch projection and run through the pre-trained encoder.
2. Isolated attention: the semantic tokens read the patch tokens, the patch tokens never
   read the semantic tokens, so the encoder's patch features stay as pre-trained.
3. A grouping layer before the projector gathers similar patches into the semantic tokens
   (no segmentation masks); the ``num_groups`` grouped tokens replace the patch tokens
   that the language model sees.

Guessed (none of this is in the abstract):
- The encoder pass (``encode_semantic``): since the patches never attend to the semantic
  tokens, their path is computed after the host's encoder ran, from each block's input
  (``signals.layers``) and the bound blocks (``bind(vision_tower.blocks)``; timm-style
  ``norm1 / attn.qkv / attn.proj / norm2 / mlp``): per block, the semantic queries attend
  to the keys of ``[CLS, patches, semantic tokens]``. The host exposes block outputs only,
  so the semantic tokens enter at block 1 (block 0's input, the embeddings, is not given).
  Unbound (a transformers LLaVA through ``reference.attach``, the shared contract): the
  semantic tokens enter the grouping layer as they are, learned queries only.
- Grouping: GroupViT's ``GroupingBlock`` without its pre-assignment cross-attention and
  token MLP (the encoder pass plays their part): ``norm_tokens`` / ``norm_x``, an
  ``assign`` attention whose softmax runs over the groups, made hard (one-hot, straight
  through; Gumbel noise while training, as GroupViT), each group the mean of its values
  (``assign_eps`` 1), ``proj``, a residual on the semantic token, then ``norm_new_x`` and
  ``mlp_channels`` (4x), residual; then LLaVA's 2-layer GELU MLP (``mm_projector``).
- Defaults: CLIP-L (1024) to a 4096-wide LLM, 256 semantic tokens (the abstract gives no
  count); the semantic tokens start as ``trunc_normal(std=0.02)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


def isolated_block(block: nn.Module, context: Tensor, tokens: Tensor) -> Tensor:
    """One pre-norm ViT block in which only ``tokens [B, G, C]`` are updated: their queries
    attend to the keys of ``[context; tokens]``; ``context [B, N, C]`` is the block's input."""
    attn = block.attn
    b, g, c = tokens.shape
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(torch.cat([context, tokens], 1)))
    q, k, v = qkv.view(b, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # [B, H, N + G, D]
    out = F.scaled_dot_product_attention(q[:, :, -g:], k, v)  # [B, H, G, D]
    tokens = tokens + attn.proj(out.transpose(1, 2).reshape(b, g, c))
    return tokens + block.mlp(block.norm2(tokens))


def hard_assign(logits: Tensor, gumbel: bool) -> Tensor:
    """``[B, G, N]`` one-hot over the groups (dim 1) per patch, with the softmax's gradient."""
    if gumbel:
        logits = logits - torch.empty_like(logits).exponential_().log()  # Gumbel(0, 1) noise
    soft = logits.float().softmax(1)
    hard = F.one_hot(soft.argmax(1), soft.shape[1]).transpose(1, 2).to(soft)
    return (hard - soft.detach() + soft).to(logits.dtype)


class AssignAttention(nn.Module):
    """Cross-attention from the groups to the patches, normalised over the groups."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**-0.5
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, groups: Tensor, x: Tensor, gumbel: bool) -> tuple[Tensor, Tensor]:
        logits = self.q_proj(groups) @ self.k_proj(x).transpose(1, 2) * self.scale  # [B, G, N]
        assign = hard_assign(logits, gumbel)
        weights = assign / (assign.sum(-1, keepdim=True) + 1)  # GroupViT's assign_eps = 1
        return self.proj(weights @ self.v_proj(x)), assign


@register
class VisToG(Projector):
    """Semantic tokens read the encoder through isolated attention, then group the patches."""

    catalog_id = "vistog"
    kind = "merging"
    basis = "paper (provisional)"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "num_groups": 4},
    }
    invalid_configs = (({"num_groups": 0}, "num_groups"),)
    count_argument = "num_groups"

    def __init__(self, in_dim: int = 1024, out_dim: int = 4096, num_groups: int = 256):
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_groups = num_groups
        self.semantic_tokens = nn.Parameter(torch.empty(1, num_groups, in_dim))
        nn.init.trunc_normal_(self.semantic_tokens, std=0.02)
        self.norm_tokens, self.norm_x = nn.LayerNorm(in_dim), nn.LayerNorm(in_dim)
        self.assign = AssignAttention(in_dim)
        self.norm_new_x = nn.LayerNorm(in_dim)
        self.mlp_channels = nn.Sequential(
            nn.Linear(in_dim, 4 * in_dim), nn.GELU(), nn.Linear(4 * in_dim, in_dim)
        )
        self.mm_projector = nn.Sequential(
            nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )
        self._blocks: tuple[nn.ModuleList, ...] = ()  # not a submodule: the encoder's own

    def bind(self, blocks: nn.ModuleList) -> VisToG:
        """Run the semantic tokens through these (frozen, shared) vision blocks."""
        self._blocks = (blocks,)
        return self

    def num_tokens(self, n: int) -> int:
        if self.num_groups >= n:
            raise ValueError(f"num_groups must be < the {n} patch tokens, got {self.num_groups}")
        return self.num_groups

    def encode_semantic(self, layers: tuple[Tensor, ...], b: int) -> Tensor:
        """``[B, G, C]`` semantic tokens after blocks ``1 .. len(layers) - 1`` of the encoder."""
        tokens = self.semantic_tokens.repeat(b, 1, 1)  # not a view: FlopCounterMode hooks it
        if self._blocks:
            for i in range(1, len(layers)):  # block i reads layers[i - 1]
                tokens = isolated_block(self._blocks[0][i], layers[i - 1], tokens.to(layers[i]))
        return tokens

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        b, n, _ = features.shape
        self.num_tokens(n)
        groups = self.encode_semantic(signals.layers, b).to(features.dtype)
        out, assign = self.assign(self.norm_tokens(groups), self.norm_x(features), self.training)
        groups = groups + out
        groups = groups + self.mlp_channels(self.norm_new_x(groups))
        signals.state["vistog"] = {"assign": assign.detach().argmax(1)}  # [B, N] group per patch
        return self.mm_projector(groups)


__all__ = ["AssignAttention", "VisToG", "hard_assign", "isolated_block"]
