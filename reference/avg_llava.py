"""AVG-LLaVA: multi-granularity pooling of the visual tokens and a router that picks one.

Paper: "AVG-LLaVA: An Efficient Large Multimodal Model with Adaptive Visual Granularity",
https://arxiv.org/abs/2410.02745
Official code: https://github.com/DeepLearnXMU/AVG-LLaVA, ``llava/model/multimodal_router/
builder.py``: ``Router`` (with ``TextFilterCosine`` and ``hard_softmax``), fed by
``build_vision_projector`` (``multimodal_projector/builder.py``) and
``LlavaMetaForCausalLM.matryoshka_vis_token_process`` (``llava/model/llava_arch.py``).

Algorithm (Sec. 3):
1. Project the patch features with LLaVA's MLP projector (1024 -> 4096), then average-pool the
   projected grid to every granularity of ``vis_token_granularity`` (36, 72, 144, 288, 576 on
   24x24: square kernels, plus 1x2 for N/2 and 2x4 for N/8).
2. The router keeps the ``filtered_text_num`` (32) instruction tokens most cosine-similar to the
   image, concatenates all granularities and them, runs one transformer layer (``merger``), an
   MLP to one logit per granularity per token, and a learned ``voter`` weighting of the tokens.
3. LayerNorm over the granularity logits; the arg-max granularity's tokens go to the LLM (a
   straight-through one-hot in training, whose logits the RGLF ranking loss trains).

Deviations from the official code:
- Text: the official router takes the instruction's LLM token embeddings (``embed_tokens``,
  image placeholders removed) and their attention mask. Here it reads ``signals.state["text"]``
  ``[B, T, C]`` and an optional ``state["text_mask"]`` ``[B, T]``; text of the vision width
  (``in_dim``, as the contract test gives) is first mapped by ``mm_projector``, a guess so it
  lives where the image tokens are compared. No text: zero text, as the official "no text" path.
- One token count per batch: the official LLM sequence is ragged (each image its own count).
  Here the output is ``[B, max(vis_token_granularity), C]``, zero after each image's chosen
  count; the counts and the router logits are in ``signals.state["avg_llava"]``.
- Views: ``route`` takes ``[B, V, N, C]``, the official anyres crops of one image (the merger,
  ``batch_first=False`` there, attends across the views at each position; one granularity for
  all views). ``forward`` gives one view per image, as the LLaVA-1.5-style host has; anyres
  tiling, unpadding and ``image_newline`` are LLaVA-NeXT's layout, not reproduced.
- The pooling grid is ``signals.grid`` (official: ``sqrt(N)`` per side); a granularity that the
  grid cannot reach is a ValueError where ``avg_pool2d`` would silently floor there.
- Text ranking uses a stable sort of normalised dot products (ties are ordered arbitrarily
  there; the values are not used downstream).
- Weights: the checkpoint's ``model.mm_projector.*`` and ``model.router.*`` keys load with
  ``model.`` removed (``image_newline`` belongs to the LLaVA-NeXT layout, not counted).
"""

from __future__ import annotations

from itertools import pairwise
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


def pool_kernel(grid: tuple[int, int], granularity: int) -> tuple[int, int]:
    """The official kernel (= stride) that pools a ``h x w`` grid to ``granularity`` tokens."""
    h, w = grid
    n = h * w
    if granularity * 2 == n:
        kernel = (1, 2)
    elif granularity * 8 == n:
        kernel = (2, 4)
    else:
        side = int((n / max(granularity, 1)) ** 0.5)
        kernel = (max(side, 1), max(side, 1))
    if h % kernel[0] or w % kernel[1] or (h // kernel[0]) * (w // kernel[1]) != granularity:
        raise ValueError(
            f"vis_token_granularity must be N, N/2, N/8 or N/k^2 on the {h}x{w} grid "
            f"with k dividing both sides, got {granularity}"
        )
    return kernel


def granularity_pool(x: Tensor, grid: tuple[int, int], granularity: int) -> Tensor:
    """``[..., N, C]`` row-major grid tokens average-pooled to ``[..., granularity, C]``."""
    kernel = pool_kernel(grid, granularity)
    lead, c = x.shape[:-2], x.shape[-1]
    cells = x.reshape(-1, *grid, c).permute(0, 3, 1, 2)
    out = F.avg_pool2d(cells, kernel, stride=kernel).flatten(2).transpose(1, 2)
    return out.reshape(*lead, granularity, c)


@torch.no_grad()
def filter_text(image: Tensor, text: Tensor, mask: Tensor | None, k: int) -> Tensor:
    """The ``k`` text tokens of highest mean cosine similarity to the image tokens, best first,
    zero-padded to ``k`` (``TextFilterCosine``). ``image [B, N, C]``, ``text [B, T, C]``."""
    sim = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).transpose(1, 2)
    score = sim.mean(dim=1)  # [B, T]
    if mask is not None:
        score = score.masked_fill(~mask.bool(), float("-inf"))
    order = score.sort(dim=1, descending=True, stable=True).indices[:, :k]
    picked = text.gather(1, order.unsqueeze(-1).expand(-1, -1, text.shape[-1]))
    return F.pad(picked, (0, 0, 0, k - picked.shape[1]))


class Router(nn.Module):
    """The visual granularity router (official names: ``router``, ``voter``, ``norm``,
    ``merger``); ``forward`` returns the granularity logits ``[B, E]`` after the LayerNorm."""

    def __init__(self, dim: int, granularities: tuple[int, ...], text_num: int, heads: int):
        super().__init__()
        experts, length = len(granularities), sum(granularities) + text_num
        self.router = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, experts))
        self.voter = nn.Parameter(torch.randn(length, 1))  # one weight per sequence position
        self.norm = nn.LayerNorm(experts)
        self.merger = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim)
        nn.init.kaiming_normal_(self.router[0].weight)
        nn.init.kaiming_normal_(self.router[2].weight)

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens [B, V, L, C]``: all granularities then the filtered text, per view."""
        b, v, length, c = tokens.shape
        # batch_first=False as there: the layer's sequence axis is the views of one image
        merged = self.merger(tokens.transpose(0, 1).reshape(v, b * length, c))
        merged = merged.reshape(v, b, length, c).transpose(0, 1)
        logits = torch.einsum("bvle,lo->bve", self.router(merged), self.voter.to(merged.dtype))
        return self.norm(logits.mean(dim=1))  # [B, E]


@register
class AVGLLaVA(Projector):
    """LLaVA's MLP projector, the pooled granularities, and the router's choice among them."""

    catalog_id = "avg_llava"
    kind = "pooling"
    count_argument = "granularity"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "vis_token_granularity": (2, 4, 8)},
    }
    invalid_configs = (
        ({"vis_token_granularity": ()}, "vis_token_granularity"),
        ({"vis_token_granularity": (8, 4)}, "vis_token_granularity"),
        ({"vis_token_granularity": (0, 4)}, "vis_token_granularity"),
        ({"granularity": 3}, "granularity"),
        ({"filtered_text_num": -1}, "filtered_text_num"),
        ({"merger_heads": 5}, "merger_heads"),
    )

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        vis_token_granularity: tuple[int, ...] = (36, 72, 144, 288, 576),
        filtered_text_num: int = 32,
        granularity: int | None = None,
        mlp_depth: int = 2,
        merger_heads: int = 8,
    ):
        """``granularity`` fixes the count and skips the router (the official forward's
        ``vis_token_granularity`` argument); ``None`` lets the router choose per image."""
        super().__init__()
        grans = tuple(int(g) for g in vis_token_granularity)
        if not grans or min(grans) < 1 or any(a >= b for a, b in pairwise(grans)):
            raise ValueError(f"vis_token_granularity must be positive and increasing, got {grans}")
        if granularity is not None and granularity not in grans:
            raise ValueError(f"granularity must be one of {grans} or None, got {granularity}")
        if filtered_text_num < 0:
            raise ValueError(f"filtered_text_num must be >= 0, got {filtered_text_num}")
        if merger_heads < 1 or out_dim % merger_heads:
            raise ValueError(
                f"merger_heads must be >= 1 and divide out_dim={out_dim}, got {merger_heads}"
            )
        if mlp_depth < 1:
            raise ValueError(
                f"mlp_depth must be >= 1 (LLaVA's mlp{{depth}}x_gelu), got {mlp_depth}"
            )
        self.granularities, self.granularity = grans, granularity
        self.in_dim, self.text_num = in_dim, filtered_text_num
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(1, mlp_depth):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.mm_projector = nn.Sequential(*layers)
        self.router = Router(out_dim, grans, filtered_text_num, merger_heads)

    def num_tokens(self, n: int) -> int:
        return self.granularity or self.granularities[-1]

    def route(
        self, views: Tensor, grid: tuple[int, int], text: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Route ``views [B, V, N, C_v]`` (V crops of each image).

        Returns:
            tokens ``[B, V, max granularity, out_dim]`` (zero after the chosen count), the
            chosen counts ``[B]`` and the router logits ``[B, E]`` (for the ranking loss).
        """
        feats = self.mm_projector(views)  # [B, V, N, D]
        scales = [granularity_pool(feats, grid, g) for g in self.granularities]
        b, v, _, d = feats.shape
        if text is None:
            text = feats.new_zeros(b, 1, d)
        elif text.shape[-1] != d:
            text = self.mm_projector(text)
        kept = filter_text(feats[:, 0], text.to(feats.dtype), mask, self.text_num)  # [B, k, D]
        tokens = torch.cat([*scales, kept.unsqueeze(1).expand(-1, v, -1, -1)], dim=2)
        logits = self.router(tokens)
        index = logits.argmax(dim=-1)  # [B]
        probs = F.one_hot(index, len(scales)).to(logits.dtype)
        if self.training:  # straight-through: the value is one-hot, the gradient the softmax's
            soft = logits.softmax(dim=-1)
            probs = probs - soft.detach() + soft
        top = self.granularities[-1]
        out = sum(
            p[:, None, None, None] * F.pad(s, (0, 0, 0, top - s.shape[2]))
            for p, s in zip(probs.unbind(-1), scales, strict=True)
        )
        counts = torch.tensor(self.granularities, device=index.device)[index]
        keep = torch.arange(top, device=index.device) < counts[:, None]  # the official cut
        return out * keep[:, None, :, None].to(out.dtype), counts, logits

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        n = features.shape[1]
        grid = signals.grid if signals.grid[0] * signals.grid[1] == n else (int(n**0.5),) * 2
        if grid[0] * grid[1] != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        if self.granularity is not None:
            return granularity_pool(self.mm_projector(features), grid, self.granularity)
        text, mask = signals.state.get("text"), signals.state.get("text_mask")
        out, counts, logits = self.route(features.unsqueeze(1), grid, text, mask)
        signals.state["avg_llava"] = {"num_tokens": counts, "router_logits": logits}
        return out[:, 0]
