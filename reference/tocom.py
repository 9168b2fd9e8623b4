"""ToCom: Token Compensator.

Paper: "Token Compensator: Altering Inference Cost of Vision Transformer without
Re-Tuning", https://arxiv.org/abs/2408.06798
Official code: https://github.com/JieShibo/ToCom (``models.py``: ``Adapter``,
``forward_attn``, ``forward_block_tome``; ``engine.py``; ``losses.py``)

Algorithm (Sec. 3):
1. A model fine-tuned with ToMe at merging degree ``m`` (tokens merged per block)
   is run at another degree ``n``; ToCom adds a low-rank delta to the attention
   values (and queries) that closes the gap between the two degrees.
2. The delta is a LoRA whose rank is split into one chunk per degree step
   ``k -> k+1``; ``Delta(m -> n)`` switches on the chunks ``m < k <= n`` (with a
   minus sign when ``n < m``), so ``Delta(a->b) + Delta(b->c) = Delta(a->c)``.
3. It is learned once, on the frozen pre-trained model, by self-distillation:
   the student runs at ``n`` with ``Delta(m -> n)``, the teacher at ``m`` without.

Deviations from the official code:
- The host's hooks sit outside the attention, so the compensator cannot change
  ``q`` and ``v`` inside it. At the ``"mid"`` hook (after attention, before the
  MLP, where ToMe merges) this module adds the value-path term of the compensated
  attention to the residual stream, ``s * sum_h A_h (Delta_v)_h W_proj,h``, from
  the host's ``attn`` and ``values`` signals, then merges ``r_tgt`` tokens with
  ``reference.tome`` (whose deviations hold here too). Reparametrisation: the
  down-projection reads the values ``V = LN(x) W_v + b_v`` instead of ``LN(x)``,
  and the up-projection is stored per head with ``W_proj`` folded in (``[H, R, C]``
  instead of ``[R, C]``). An official adapter maps onto it exactly only when
  ``W_v`` is invertible and ``b_v = 0``. With a value bias (every timm/DeiT ViT has
  a qkv bias) the mapped adapter adds, on top of the official delta, the same
  vector to every token, ``s * sum_h (mask * down b_v) up_h`` with the mapped
  ``down``/``up`` (attention rows sum to 1), so it does not reproduce the official
  outputs.
- Chunk ``k`` sits at dims ``[(k-1) rank, k rank)``; the official adapter puts
  degree 1 at the end of its width (reverse the chunks to load its weights).
- The query-path delta (``s * Delta_q``, which reshapes the attention map) is
  left out: it needs per-head queries and keys, which the host does not expose.
- Prefix (CLS) tokens: in the official code the compensation is part of the
  attention output, so it changes them too. Here they are protected, as the
  contract requires (``reference.core``): only the other tokens are compensated
  (they still mix the prefix tokens' values), so the prefix tokens come out unchanged
  whatever the signals, and a NaN in a sample's signals never reaches its CLS.
  ``compensate_prefix=True`` compensates them as the official code does. With the
  official zero initialisation of the up-projection the compensation is zero.
- Degrees outside ``[0, max_r]`` raise a ValueError (the official mask has one
  chunk per degree up to 16 and fails to reshape for the others).
- Left out: the pre-training recipe (random ``(r_tgt, r_src)`` pairs per step in
  0..16, soft distillation from a ToMe teacher at ``r_src``, 10 epochs), and the
  search of the scale ``s`` at evaluation. ``r_src``/``r_tgt`` are plain
  attributes, so a training loop can set them per step. The training path
  differs from inference only by the official dropout (0.1) on the
  down-projection; the token count is the merged one in both.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer
from reference.registry import register
from reference.tome import merge_wavg


def degree_mask(rank: int, max_r: int, r_src: int, r_tgt: int, device=None) -> Tensor:
    """``[rank * max_r]`` chunk switches of ``Delta(r_src -> r_tgt)``: +1, -1 or 0.

    Chunk ``k`` (1-based, ``rank`` dims each) models the step from degree
    ``k - 1`` to ``k``.
    """
    step = torch.arange(rank * max_r, device=device) // rank + 1  # degree of each dim
    return (step <= r_tgt).float() - (step <= r_src).float()


def compensate(
    x: Tensor,
    attn: Tensor,
    values: Tensor,
    down: Tensor,
    up: Tensor,
    mask: Tensor,
    scale: float,
    dropout: nn.Module | None = None,
) -> Tensor:
    """Add the value-path compensation to ``x [B, Q, C]`` after attention.

    Args:
        x: ``[B, Q, C]`` the tokens to compensate: all ``N`` tokens, or the last ``Q``.
        attn: ``[B, H, Q, N]`` the attention rows of those tokens (probabilities).
        values: ``[B, H, N, D]`` attention values.
        down: ``[R, C]`` down-projection of the concatenated values.
        up: ``[H, R, C]`` per-head up-projection, output projection folded in.
        mask: ``[R]`` from ``degree_mask``.
    """
    b, h, n, d = values.shape
    y = values.transpose(1, 2).reshape(b, n, h * d) @ down.t()  # [B, N, R]
    if dropout is not None:
        y = dropout(y)
    y = y * mask.to(y.dtype)
    mixed = attn @ y[:, None]  # [B, H, Q, R]: the attention mixes Delta_v like v
    return x + scale * torch.einsum("bhnr,hrc->bnc", mixed, up)


@register
class ToCom(TokenReducer):
    """ToMe at ``r_tgt`` plus the compensator ``Delta(r_src -> r_tgt)`` (one per block)."""

    catalog_id = "tocom"
    kind = "merging"
    needs = frozenset({"keys", "attn", "values"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"dim": 32, "num_heads": 4, "r_src": 0, "r_tgt": 0},
        "some": {"dim": 32, "num_heads": 4, "r_src": 0, "r_tgt": 4},
    }

    def __init__(
        self,
        dim: int,
        num_heads: int,
        r_src: int = 0,
        r_tgt: int = 0,
        rank: int = 2,
        max_r: int = 16,
        scale: float = 0.1,
        dropout: float = 0.1,
        compensate_prefix: bool = False,
    ):
        """``r_src``/``r_tgt``: merging degrees in ``[0, max_r]``; ``compensate_prefix``:
        also compensate the prefix tokens (official; breaks the prefix protection)."""
        super().__init__()
        if max_r < 1:
            raise ValueError(f"max_r must be >= 1, got {max_r}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        for name, value in (("r_src", r_src), ("r_tgt", r_tgt)):
            if not 0 <= value <= max_r:
                raise ValueError(f"{name} must be in [0, max_r={max_r}], got {value}")
        self.r_src, self.r_tgt = r_src, r_tgt
        self.compensate_prefix = compensate_prefix
        self.rank, self.max_r, self.scale = rank, max_r, scale
        width = rank * max_r  # official: tocom_dim = 2 * 16
        self.down = nn.Parameter(torch.empty(width, dim))  # [R, C]
        nn.init.kaiming_uniform_(self.down, a=5**0.5)  # nn.Linear's default, as official
        self.up = nn.Parameter(torch.zeros(num_heads, width, dim))  # [H, R, C], zero init
        self.dropout = nn.Dropout(dropout)

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        kept = n - max(0, min(self.r_tgt, (n - prefix) // 2))
        return kept, kept

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        if self.r_src != self.r_tgt:  # official: no delta when the degrees agree
            mask = degree_mask(self.rank, self.max_r, self.r_src, self.r_tgt, x.device)
            p = 0 if self.compensate_prefix else signals.prefix  # rows left as they are
            comp = compensate(
                x[:, p:],
                signals.attn[:, :, p:],
                signals.values,
                self.down,
                self.up,
                mask,
                self.scale,
                self.dropout if self.training else None,
            )
            x = torch.cat([x[:, :p], comp], 1)
        return merge_wavg(x, signals.size, self.r_tgt, signals.prefix, signals.keys)
