"""A-ViT: Adaptive Tokens for Efficient Vision Transformer.

Paper: "A-ViT: Adaptive Tokens for Efficient Vision Transformer",
https://arxiv.org/abs/2112.07658
Official code: https://github.com/NVlabs/A-ViT
(``timm/models/act_vision_transformer.py``: ``Block_ACT.forward_act``,
``VisionTransformer.forward_features_act_token``)

Algorithm (Adaptive Computation Time per token):
1. After every block, token k gets a halting score ``h_k = sigmoid(gamma * t_k[0] -
   beta)`` read from the first channel of its embedding (no extra parameters).
2. Halting scores add up over the blocks; a token halts (is no longer processed
   nor attended to) once its cumulative score reaches ``1 - eps``.
3. Training keeps the count fixed and masks halted tokens; the ponder loss
   ``rho_k = N_k + r_k`` (blocks run plus the remainder ``r_k = 1 - sum of the earlier
   h``) and a distributional prior on the halting layer push tokens to halt early.

Deviations from the official code:
- Hook: ``"pre"`` of every block from the second on: the step reads the output of
  the previous block, so a token that halts there skips all later blocks, as in
  the official loop. The cumulative score, remainder and ponder cost live in
  ``signals.state["a_vit"]``, so attach A-ViT to consecutive blocks and to no other
  method. The official last block forces every token to halt; not reproduced.
- Prefix tokens get halting scores and halt like the others, as in the official
  code (its CLS token halts too); ``pin_prefix=True`` keeps them running instead.
  A halted prefix token stops accumulating and pondering and is 0 in the training
  ``Reduction.mask``, but it stays in place and, at inference, is still attended
  and updated: the host cannot freeze a token, and an image whose tokens had all
  halted would have nothing left to attend. The official code also classifies from
  the CLS token's halting-weighted average over the blocks; the host classifies
  from the last CLS state, so that average is not formed.
- Batches: every image drops exactly its halted tokens; the batch is padded to the
  largest count with *empty slots* (x 0, size 0, index -1, ``Reduction.mask`` 0)
  after each image's own tokens. The hosts mask empty slots out of attention,
  like the official masked (-1000 bias) halted tokens, so an image's result does
  not depend on its batch. Empty slots count as halted later on.
  (The padding is the shared ``reference.ops.keep_padded``.)
- ``max_keep`` (default 1.0, i.e. off) caps the running fraction of an image's
  tokens entering a step, halting those with the largest cumulative score first;
  it is not in the paper and only gives ``budget`` an upper bound below ``n``.
- Inference removes halted tokens; the official code masks them (zeroed, -1000
  attention bias) in training and evaluation alike and never shortens the batch.
- Training: halted tokens are neither zeroed nor removed; the running mask is
  returned in ``Reduction.mask``, and the ViT host leaves the halted tokens out of
  every later attention as keys (they are still updated, where the official code
  zeroes them). The ponder cost ``state["a_vit"]["ponder"]`` keeps its gradient
  for the ponder loss; the losses (ponder, distributional prior) are not
  implemented here. Cumulative scores are kept in float32.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity
from reference.ops import cap_keep, keep_padded
from reference.registry import register


def halting_scores(
    x: Tensor, prefix: int, gate_scale: float, gate_center: float, pin_prefix: bool = False
) -> Tensor:
    """``h = sigmoid(gate_scale * x[..., 0] - gate_center)`` in float32 (0 for the first
    ``prefix`` tokens if ``pin_prefix``).

    Args:
        x: ``[B, N, C]`` tokens (the output of the block that just ran).

    Returns:
        ``[B, N]`` halting scores.
    """
    h = torch.sigmoid(gate_scale * x[..., 0].float() - gate_center)  # [B, N]
    if not pin_prefix:
        return h
    is_prefix = torch.arange(x.shape[1], device=x.device) < prefix
    return h.masked_fill(is_prefix, 0.0)


def halting_step(
    h: Tensor, running: Tensor, state: dict[str, Tensor], eps: float, max_keep: float, prefix: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """One ACT step for every token.

    Args:
        h: ``[B, N]`` halting scores of the block that just ran.
        running: ``[B, N]`` bool, tokens that block processed.
        state: ``cumulative``, ``remainder``, ``ponder``, each ``[B, N]``.
        eps: a token halts once its cumulative score reaches ``1 - eps``.
        max_keep: at most this fraction of the running non-prefix tokens keeps running.

    Returns:
        ``[B, N]`` bool tokens still running, and the updated state.
    """
    cumulative = state["cumulative"] + h * running
    still = running & (cumulative < 1 - eps)
    # The cap halts the tokens closest to halting first.
    still_rest = cap_keep(still[:, prefix:], -cumulative[:, prefix:], max_keep, running[:, prefix:])
    still = torch.cat([still[:, :prefix], still_rest], dim=1)
    halted_now = running & ~still
    # Ponder cost rho = N + r: one per block run, plus the remainder when halting.
    ponder = state["ponder"] + running + state["remainder"] * halted_now
    remainder = state["remainder"] - h * still
    return still, {"cumulative": cumulative, "remainder": remainder, "ponder": ponder}


@register
class AViT(TokenReducer):
    """Halt tokens whose cumulative halting score reached ``1 - eps``."""

    catalog_id = "a_vit"
    kind = "adaptive-computation"
    needs = frozenset()
    where = "pre"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"gate_center": 1e4},
        "some": {"gate_scale": 10.0, "gate_center": 0.0, "max_keep": 0.75},
    }

    def __init__(
        self,
        gate_scale: float = 10.0,
        gate_center: float = 30.0,
        eps: float = 0.01,
        max_keep: float = 1.0,
        pin_prefix: bool = False,
    ):
        super().__init__()
        if not 0 < max_keep <= 1:
            raise ValueError(f"max_keep must be in (0, 1], got {max_keep}")
        if not 0 <= eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        # Official DeiT-T recipe: gate_scale 10, gate_center 30 (75 for DeiT-S), eps 0.01.
        self.gate_scale = gate_scale
        self.gate_center = gate_center
        self.eps = eps
        self.max_keep = max_keep
        self.pin_prefix = pin_prefix  # True: prefix tokens never halt (official: they do)

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        return prefix, prefix + int(self.max_keep * (n - prefix))

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, _ = x.shape
        prefix, size = signals.prefix, signals.size
        if b == 0 and not self.training:  # an empty batch: the budget's shapes
            return empty_batch(x, signals.size, self.budget(n, prefix)[0])
        state = signals.state.get("a_vit")
        if state is None or state["cumulative"].shape != (b, n):
            zeros = x.new_zeros(b, n, dtype=torch.float32)
            state = {
                "cumulative": zeros,
                "remainder": zeros + 1,
                "ponder": zeros,
                "running": size[..., 0] > 0,
            }
        if self.training:
            running = state["running"]  # [B, N]
        else:  # dropped tokens are gone; a halted prefix token is still there
            running = size[..., 0] > 0
            running[:, :prefix] &= state["running"][:, :prefix]
        h = halting_scores(x, prefix, self.gate_scale, self.gate_center, self.pin_prefix)
        still, new = halting_step(h, running, state, self.eps, self.max_keep, prefix)
        if self.training:
            signals.state["a_vit"] = {**new, "running": still}
            ar = torch.arange(n, device=x.device).expand(b, n)
            return Reduction(x=x, size=size, index=ar, assign=ar, mask=still.to(x.dtype))
        if bool(still.all()):
            signals.state["a_vit"] = {**new, "running": still}
            return identity(x, size)
        out = keep_padded(x, size, prefix, still[:, prefix:])
        src = out.index.clamp_min(0)  # empty slots read token 0 and are masked by size 0
        signals.state["a_vit"] = {k: v.gather(1, src) for k, v in {**new, "running": still}.items()}
        return out
