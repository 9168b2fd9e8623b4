"""Patch Slimming: top-down, data-driven choice of the patches each layer keeps.

Paper: "Patch Slimming for Efficient Vision Transformers", https://arxiv.org/abs/2106.02852
Official code: none released (the catalog has no code link); this follows the paper.

Algorithm:
1. Masks ``m_l`` say which patches layer ``l`` computes; they are nested
   (``m_l`` contains ``m_{l+1}``), and the last layer needs only the class token.
2. Going from the last layer down, the impact of patch ``i`` of layer ``t`` on the
   kept outputs is approximated by a significance score: the squared norm of the
   attention paths that carry it to the kept patches of layers ``t+1..L``
   (products of ``diag(m_l) P_{h,l}``, summed over all head choices) times the
   squared norm of its own attention output ``P_{h,t} V_{h,t}`` (row ``i``).
3. ``m_t`` is ``m_{t+1}`` plus the highest-scoring patches; the slimmed model is
   then fine-tuned with the masks fixed (a static, pyramid-shaped ViT).

Deviations from the paper:
- The paper grows each ``m_t`` by a search granularity until the error of layer
  ``t+1`` drops below a tolerance, fine-tuning layer ``t`` at every step; here the
  number of patches per layer is given (``keep``) and there is no fine-tuning. All
  scores come from one calibration forward of the unpruned model (averaged over
  the batch), not from the progressively pruned and fine-tuned one.
- The head-path sum is computed exactly by a recursion on ``[N, N]`` Gram matrices
  (``G <- sum_h P_h^T D G D P_h``) instead of enumerating head paths; this is our
  reading of the score, which the paper states as a sum over head paths.
- Host mapping: ``PatchSlimming`` at the ``"mid"`` hook of block ``l`` removes the
  patches outside ``m_l`` after the attention (their rows of ``diag(m_l) P`` are
  dropped; they still served as keys/values in that block, as in the paper) and
  before the MLP. Positions are original token positions, followed across layers
  through ``signals.state`` (valid when only this method reduces tokens).
- Prefix tokens are always kept. The dynamic variant (DPS-ViT) is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity, keep_tokens
from reference.hosts import vit
from reference.registry import register

POS_KEY = "patch_slimming.positions"
RECORD_KEY = "patch_slimming.record"


def path_gram(later_attn: Sequence[Tensor], later_masks: Sequence[Tensor]) -> Tensor:
    """``sum over head paths of A^T A`` with ``A = prod_l diag(m_l) P_{h_l,l}`` -> ``[B, N, N]``.

    Args:
        later_attn: attention maps ``[B, H, N, N]`` of layers ``t+1..L`` (shallow first).
        later_masks: their keep masks ``[N]`` (bool).
    """
    b, _, n, _ = later_attn[0].shape
    gram = torch.eye(n, device=later_attn[0].device).expand(b, n, n)
    # The head sum of each layer factors out, so go from the last layer inwards.
    for attn, mask in zip(reversed(later_attn), reversed(later_masks), strict=True):
        d = mask.to(gram.dtype)
        inner = gram * d[:, None] * d[None, :]  # D G D
        gram = torch.einsum("bhji,bjk,bhkl->bil", attn.float(), inner, attn.float())
    return gram


def significance(
    attn: Tensor, values: Tensor, later_attn: Sequence[Tensor], later_masks: Sequence[Tensor]
) -> Tensor:
    """Score ``[B, N]`` of every patch of layer ``t`` from its ``attn [B, H, N, N]`` and
    ``values [B, H, N, D]`` and the maps and masks of the layers after it."""
    with torch.no_grad():
        own = (attn.float() @ values.float()).square().sum(dim=(1, 3))  # sum_h |U_h[i]|^2
        if not later_attn:
            return own
        return torch.diagonal(path_gram(later_attn, later_masks), dim1=1, dim2=2) * own


def top_down_masks(
    attn: Sequence[Tensor], values: Sequence[Tensor], keep: Sequence[int], prefix: int
) -> Tensor:
    """Nested keep masks ``[L, N]`` (bool), chosen from the last layer down.

    ``keep[l]`` is the number of non-prefix patches layer ``l`` computes (at least
    as many as layer ``l+1`` keeps); ``keep[-1] = 0`` is the paper's last layer.
    """
    depth, n = len(attn), attn[0].shape[-1]
    masks: list[Tensor] = [torch.zeros(0)] * depth
    needed = torch.zeros(n, dtype=torch.bool, device=attn[0].device)
    needed[:prefix] = True
    for t in range(depth - 1, -1, -1):
        score = significance(attn[t], values[t], attn[t + 1 :], masks[t + 1 :]).mean(0)  # [N]
        score = score.masked_fill(needed, torch.inf)  # m_t contains m_{t+1}
        count = prefix + max(min(keep[t], n - prefix), int(needed.sum()) - prefix)
        mask = torch.zeros_like(needed)
        mask[score.topk(count).indices] = True
        masks[t] = needed = mask
    return torch.stack(masks)


class _Recorder(TokenReducer):
    """Keeps every token and records the attention maps and values of its block."""

    needs = frozenset({"attn", "values"})
    where = "mid"

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        signals.state.setdefault(RECORD_KEY, []).append((signals.attn, signals.values))
        return identity(x, signals.size)


@register
class PatchSlimming(TokenReducer):
    """A slimmed layer: keeps the tokens at the original ``positions`` (prefix always)."""

    catalog_id = "patch_slimming"
    basis = "abstract and a third-party reproduction (no official code)"
    kind = "pruning"
    needs = frozenset()
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {},
        "some": {"positions": list(range(0, 17, 2))},
    }

    def __init__(self, positions: Sequence[int] | Tensor | None = None):
        super().__init__()
        pos = None if positions is None else torch.as_tensor(positions, dtype=torch.long)
        self.register_buffer("positions", pos)

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        if self.positions is None:
            return n, n
        kept = prefix + int(((self.positions >= prefix) & (self.positions < n)).sum())
        return prefix, kept

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, _ = x.shape
        prefix = signals.prefix
        if self.positions is None:
            return identity(x, signals.size)
        if b == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(n, prefix)[0])
        pos = signals.state.get(POS_KEY)
        if pos is None or pos.shape != (b, n):
            pos = torch.arange(n, device=x.device).expand(b, n)
        keep = torch.isin(pos[:, prefix:], self.positions.to(x.device))  # [B, N - prefix]
        if bool(keep.all()):
            return identity(x, signals.size)
        # Positions are shared by the whole batch, so every row keeps the same count.
        idx = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, : int(keep[0].sum())]
        out = keep_tokens(x, signals.size, prefix, idx + prefix)
        signals.state[POS_KEY] = pos.gather(1, out.index)
        return out


def slim(
    model: vit.VisionTransformer, images: Tensor, keep: Sequence[int]
) -> dict[int, PatchSlimming]:
    """Choose every layer's patches on calibration ``images``; returns reducers for
    ``vit.apply`` (one per block; ``keep`` as in ``top_down_masks``)."""
    depth = len(model.blocks)
    vit.apply(model, {layer: _Recorder() for layer in range(depth)})
    with torch.no_grad():
        model(images)
    vit.apply(model, {})
    record = model.last_state.state[RECORD_KEY]
    masks = top_down_masks(
        [a for a, _ in record], [v for _, v in record], keep, model.num_prefix_tokens
    )
    return {layer: PatchSlimming(m.nonzero()[:, 0]) for layer, m in enumerate(masks)}
