"""PYRA: Parallel Yielding Re-Activation.

Paper: "PYRA: Parallel Yielding Re-Activation for Training-Inference Efficient Task
Adaptation", https://arxiv.org/abs/2403.09192
Official code: https://github.com/THU-MIG/PYRA (``model/adaptive_merge.py``,
``model/tome.py``, ``model/vision_transformer_timm.py``)

Algorithm (Sec. 3, "parallel yielding re-activation"):
1. Plan ToMe's bipartite soft matching on the head-averaged keys: ``r`` source
   tokens of set A each go to their most similar B token.
2. For each (source, destination) pair, ``p = LN(x_src + x_dst)``; two learned
   weights are produced in parallel: a channel weight ``w_c = 2 sigmoid(a^T p)``
   ``[B, 1, C]`` that pools the ``r`` pairs, and a token weight
   ``w_t = 2 sigmoid(p b) - 1`` ``[B, r, 1]``.
3. Re-activate the sources, ``x_src <- x_src + (x_src * w_c) * w_t``, then merge
   them into their destinations by ToMe's size-weighted average. With ``b = 0``
   (its initialisation) this is exactly ToMe.

Deviations from the official code:
- Hook: ``"mid"`` (after attention, before the MLP), where the official
  ``ToMeBlock`` merges; the metric is the host's ``keys`` signal. The matching is
  ``reference.tome.bipartite_soft_matching``, so every deviation listed in
  ``reference/tome.py`` (prefix handling, no source tracing) holds here too.
- ``a`` is ``[r, 1]`` for the configured ``r``; when fewer tokens can be merged
  (``r`` clipped to half the non-prefix tokens) only its first rows are used,
  where the official code would fail on the shape mismatch.
- The re-activation is added to ToMe's merged sum as a correction scattered
  onto the destinations (same arithmetic as the official in-place update of
  the size-weighted sources; the official code also re-activates ``x * size``).
- No training/inference switch: the official forward is the same in both (the
  token count is reduced during fine-tuning too), so ``Reduction.mask`` is None.
- Left out: the PEFT modules PYRA is trained with (LoRA/adapters), the merging
  schedules per model (``get_merging_schedule``: set ``r`` per layer from
  outside) and the separate learning rate for the PYRA weights.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, identity
from reference.registry import register
from reference.tome import bipartite_soft_matching, merge_wavg


def reactivation(pairs: Tensor, a: Tensor, b: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """The two parallel weights of PYRA for ``pairs = x_src + x_dst`` ``[B, r, C]``.

    Returns the channel weight ``[B, 1, C]`` in (0, 2) and the token weight
    ``[B, r, 1]`` in (-1, 1).
    """
    p = norm(pairs)
    w_channel = 2 * torch.sigmoid(torch.einsum("rk,brc->bkc", a, p))  # [B, 1, C]
    w_token = 2 * torch.sigmoid(p @ b.transpose(0, 1)) - 1  # [B, r, 1]
    return w_channel, w_token


def pyra_merge(
    x: Tensor,
    size: Tensor,
    r: int,
    prefix: int,
    metric: Tensor,
    a: Tensor,
    b: Tensor,
    norm: nn.Module,
) -> Reduction:
    """ToMe step on ``x [B, N, C]`` whose ``r`` source tokens are re-activated first."""
    r = min(r, (x.shape[1] - prefix) // 2)
    if r <= 0:
        return identity(x, size)
    base = merge_wavg(x, size, r, prefix, metric)  # plain ToMe, same matching
    _, src_idx, dst_idx, _ = bipartite_soft_matching(metric, r, prefix)
    weighted = x * size  # the official code re-activates size-weighted tokens
    src = weighted[:, ::2].gather(1, src_idx[..., None].expand(-1, -1, x.shape[-1]))
    dst = weighted[:, 1::2].gather(1, dst_idx[..., None].expand(-1, -1, x.shape[-1]))
    w_channel, w_token = reactivation(src + dst, a[:r], b, norm)
    delta = (src * w_channel) * w_token  # [B, r, C]: x_src' - x_src
    # Each source lands where ToMe put it, i.e. at its destination's output slot.
    slot = base.assign.gather(1, 2 * src_idx)  # [B, r]
    correction = torch.zeros_like(base.x).scatter_add(
        1, slot[..., None].expand(-1, -1, x.shape[-1]), delta.to(base.x.dtype)
    )
    return Reduction(
        x=base.x + correction / base.size, size=base.size, index=base.index, assign=base.assign
    )


@register
class PYRA(TokenReducer):
    """ToMe with learned re-activation of the tokens about to be merged (one per block)."""

    catalog_id = "pyra"
    kind = "merging"
    needs = frozenset({"keys"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"dim": 32, "r": 0},
        "some": {"dim": 32, "r": 4},
    }

    def __init__(self, dim: int, r: int = 0):
        super().__init__()
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        self.r = r
        # Official init: a ~ kaiming_uniform(sqrt(5)), b = 0, so training starts at ToMe.
        self.a = nn.Parameter(torch.empty(max(r, 1), 1))  # [r, 1] pair weights
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.b = nn.Parameter(torch.zeros(1, dim))  # [1, C] channel projection
        self.norm = nn.LayerNorm(dim)

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        kept = n - max(0, min(self.r, (n - prefix) // 2))
        return kept, kept

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        return pyra_merge(
            x, signals.size, self.r, signals.prefix, signals.keys, self.a, self.b, self.norm
        )
