"""ViT-Slim: searching which patches each layer keeps, with learned soft masks.

Paper: "Vision Transformer Slimming: Multi-Dimension Searching in Continuous Optimization
Space", https://arxiv.org/abs/2201.00814
Official code: https://github.com/Arnav0400/ViT-Slim (``ViT-Slim/models/layers.py``,
``ViT-Slim/models/base_model.py``)

Algorithm (the patch dimension of the search):
1. Every block gets a learnable score ``zeta`` per token position (initialised to 3);
   during the one-shot search its soft mask ``tanh(zeta)`` scales that position's
   input to attention and MLP, and an l1 penalty on the masks is added to the loss.
2. After the search one global threshold over all layers keeps the ``budget``
   fraction of (layer, position) scores, and a position kept in a deeper layer is
   kept in every shallower one, so the kept sets shrink with depth.
3. The binary masks are frozen and the slimmer model is retrained.

Deviations from the official code:
- Only the patch (token) masks are implemented; the attention-dimension and
  MLP-dimension masks, the distillation loss and the search/retrain schedules are
  left out (they do not reduce tokens).
- Host mapping: one ``ViTSlim`` per block at the ``"pre"`` hook. In training
  (search) it returns the tokens unchanged and ``tanh(zeta)`` as
  ``Reduction.mask``; the hosts do not apply this mask (``masks_attention`` is
  False), so the caller multiplies the normalised attention/MLP inputs by it (the
  official ``x *= z_patch``). In eval
  the tokens outside the mask are removed, where the official retrained model
  zeroes their attention/MLP inputs and keeps them in the residual stream (its
  FLOPs count assumes removal).
- Positions are original token positions, followed across reductions through
  ``signals.state`` (valid when only ``ViTSlim`` reduces tokens in the host).
- Prefix tokens are always kept and get mask 1 (the official mask also covers CLS).
- Before ``compress`` is called, eval keeps the ``keep`` fraction of the present
  non-prefix tokens with the largest ``zeta`` (ties: lower position first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity, keep_tokens
from reference.registry import register

POS_KEY = "vit_slim.positions"


def global_patch_masks(z: Tensor, budget: float) -> Tensor:
    """Binary masks ``[L, P]`` from soft masks ``z [L, P]`` (``compress_patch``).

    One threshold for all layers keeps the ``budget`` fraction of scores; then a
    position kept in layer ``l`` is kept in every layer before it (OR from the top).
    """
    flat = z.flatten().sort().values
    threshold = flat[min(int((1.0 - budget) * flat.numel()), flat.numel() - 1)]
    keep = z >= threshold  # [L, P]
    return keep.flip(0).cummax(dim=0).values.flip(0)


def positions(signals: Signals, n: int, b: int, device: torch.device) -> Tensor:
    """Original positions ``[B, N]`` of the current tokens."""
    pos = signals.state.get(POS_KEY)
    if pos is None or pos.shape != (b, n):
        pos = torch.arange(n, device=device).expand(b, n)
    return pos


def keep_where(x: Tensor, size: Tensor, prefix: int, keep: Tensor) -> Reduction:
    """Keep the prefix and the non-prefix tokens where ``keep [B, N - prefix]`` is True;
    every row must keep the same number (position masks do)."""
    k = int(keep[0].sum())
    idx = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :k] + prefix  # [B, K]
    return keep_tokens(x, size, prefix, idx)


@register
class ViTSlim(TokenReducer):
    """Per-layer learned patch mask over ``num_tokens`` positions (prefix included)."""

    catalog_id = "vit_slim"
    kind = "rate-search"
    needs = frozenset()
    where = "pre"

    masks_attention = False  # the search mask scales attention/MLP inputs instead
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"num_tokens": 17, "keep": 1.0},
        "some": {"num_tokens": 17, "keep": 0.5},
    }

    def __init__(self, num_tokens: int, keep: float = 1.0):
        super().__init__()
        if not 0 <= keep <= 1:
            raise ValueError(f"keep must be in [0, 1], got {keep}")
        self.keep = keep
        self.zeta = nn.Parameter(torch.full((num_tokens,), 3.0))
        self.register_buffer("searched", None)  # [num_tokens] bool, set by compress

    def soft_mask(self) -> Tensor:
        return torch.tanh(self.zeta)  # [P]

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        if self.searched is not None:
            return prefix, n
        kept = prefix + round(self.keep * (n - prefix))
        return kept, kept

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, _ = x.shape
        prefix = signals.prefix
        if n > self.zeta.shape[0]:
            raise ValueError(
                f"ViTSlim was built for num_tokens={self.zeta.shape[0]} positions, got {n} tokens"
            )
        if b == 0 and not self.training:  # an empty batch: the budget's shapes
            return empty_batch(x, signals.size, self.budget(n, prefix)[0])
        pos = positions(signals, n, b, x.device)
        if self.training:
            mask = self.soft_mask().to(x.dtype)[pos]  # [B, N]
            mask = torch.cat([mask.new_ones(b, prefix), mask[:, prefix:]], dim=1)
            out = identity(x, signals.size)
            out.mask = mask
            return out
        with torch.no_grad():
            if self.searched is not None:
                keep = self.searched[pos[:, prefix:]]  # [B, N - prefix]
            else:
                k = round(self.keep * (n - prefix))
                z = self.zeta[pos[:, prefix:]]
                order = z.argsort(dim=1, descending=True, stable=True)[:, :k]
                keep = torch.zeros_like(z, dtype=torch.bool).scatter_(1, order, True)
        if bool(keep.all()):
            return identity(x, signals.size)
        out = keep_where(x, signals.size, prefix, keep)
        signals.state[POS_KEY] = pos.gather(1, out.index)
        return out


def sparsity_loss(reducers: Sequence[ViTSlim]) -> Tensor:
    """The l1 penalty on the patch masks (weighted by ``w3`` in the official search)."""
    return torch.stack([r.soft_mask().abs().sum() for r in reducers]).sum()


def compress(reducers: Sequence[ViTSlim], budget: float) -> None:
    """Freeze every reducer's mask to the global, depth-monotone binary mask."""
    with torch.no_grad():
        z = torch.stack([r.soft_mask() for r in reducers])  # [L, P]
        masks = global_patch_masks(z, budget)
    for r, m in zip(reducers, masks, strict=True):
        r.searched = m
        r.zeta.requires_grad_(False)
