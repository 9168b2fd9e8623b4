"""DynamicViT: dynamic token sparsification with learned prediction modules.

Paper: "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification",
https://arxiv.org/abs/2106.02034
Official code: https://github.com/raoyongming/DynamicViT
(``models/dyvit.py``: ``PredictorLG``, ``VisionTransformerDiffPruning.forward``)

Algorithm (Sec. 3.2-3.4):
1. A light MLP projects every token; half of its channels stay local, the other
   half are averaged over the tokens still kept (the decision mask D) into a global
   feature that is concatenated to every token.
2. A second MLP maps the result to log-probabilities of keep / drop per token.
3. Training: a hard Gumbel-softmax sample, multiplied into D, masks the dropped
   tokens out of attention (attention masking) so the count stays fixed.
4. Inference: stage ``s`` keeps the ``int(N0 * keep_ratio)`` tokens of highest keep
   probability, ``N0`` the image tokens before the first stage and ``keep_ratio`` the
   official ``token_ratio[s] = rho ** s``; stages at several depths prune hierarchically.

Deviations from the official code:
- Hook: ``"pre"`` of the pruning block, as in the official loop (the predictor
  reads the output of the previous block).
- ``N0`` is the count that entered the first DynamicViT stage of this forward, kept
  in ``signals.state["dynamicvit"]``; the official code hard-codes ``14 * 14``. So
  ``int(196 * 0.7 ** s)`` keeps 137/96/67, as the official code; a per-stage 0.7 of
  the tokens entering each stage (``relative=True``) would keep 137/95/66.
  ``budget()`` sees only the current count, so it is exact for a first stage.
- Training: ``Reduction.mask`` carries the straight-through hard decisions
  (prefix 1) and x is returned unchanged; the ViT host applies the mask as the
  official attention policy (``softmax_with_policy``, ``reference.hosts.vit``) in every
  later block, so dropped tokens are masked out of attention and the count stays
  fixed. The decision mask D is carried across
  stages in ``signals.state["dynamicvit"]``; every stage's decisions are collected
  in its ``"decisions"`` list for the keep-ratio loss. The losses (keep ratio,
  distillation of logits and tokens) are not implemented.
- The global average divides by ``max(sum D, 1)`` so a stage that dropped every
  token gives zeros instead of NaN.
- The paper's prose calls ``pi[:, 0]`` the drop probability; the code (followed
  here) uses index 0 for keep. Kept tokens are returned in spatial order (the
  official code orders them by score). All ``prefix`` tokens are protected and
  unseen by the predictor (the official code handles the CLS token only).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, identity, keep_tokens
from reference.registry import register


class ScorePredictor(nn.Module):
    """The prediction module (official ``PredictorLG``), Sec. 3.2."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_proj = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        """Keep / drop log-probabilities.

        Args:
            x: ``[B, M, C]`` the non-prefix tokens.
            policy: ``[B, M]`` the current decision mask D (1 kept, 0 dropped).

        Returns:
            ``[B, M, 2]`` log-probabilities; index 0 is keep.
        """
        z = self.in_proj(x)  # [B, M, C]
        half = z.shape[-1] // 2
        local, glob = z[..., :half], z[..., half:]
        w = policy.unsqueeze(-1).to(z.dtype)  # [B, M, 1]
        # Agg: average of the global half over the tokens D still keeps.
        glob = (glob * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1)
        return self.out_proj(torch.cat([local, glob.expand(-1, x.shape[1], -1)], dim=-1))


def top_k_keep(scores: Tensor, x: Tensor, size: Tensor, prefix: int, k: int) -> Reduction:
    """Keep the prefix and the ``k`` non-prefix tokens with the highest ``scores [B, M]``."""
    keep = scores.topk(k, dim=1).indices + prefix  # [B, k]
    return keep_tokens(x, size, prefix, keep)


@register
class DynamicViT(TokenReducer):
    """One pruning stage: a prediction module and the ratio of tokens it keeps."""

    catalog_id = "dynamicvit"
    kind = "pruning"
    needs = frozenset()
    where = "pre"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"dim": 32, "keep_ratio": 1.0},
        "some": {"dim": 32, "keep_ratio": 0.7},
    }

    @classmethod
    def paper_setting(cls, depth: int, dim: int) -> tuple[dict[int, dict], bool]:
        # The official DeiT default (``pruning_loc=[3, 6, 9]``, ``base_rate=0.7``):
        # ``token_ratio = [0.7, 0.7 ** 2, 0.7 ** 3]`` of the initial count.
        step = depth // 4
        return {step * i: {"dim": dim, "keep_ratio": 0.7**i} for i in (1, 2, 3)}, False

    def __init__(self, dim: int, keep_ratio: float = 0.7, relative: bool = False):
        super().__init__()
        if not 0 <= keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
        self.predictor = ScorePredictor(dim)
        self.keep_ratio = keep_ratio
        self.relative = relative

    def kept(self, m: int, n0: int | None = None) -> int:
        """Image tokens kept of ``m``; ``n0``: the count before the first stage (default m)."""
        base = m if self.relative or n0 is None else n0
        return min(m, int(base * self.keep_ratio))

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        """Inference count; training keeps all ``n`` tokens and masks them."""
        k = prefix + self.kept(n - prefix)
        return k, k

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, _ = x.shape
        prefix, size = signals.prefix, signals.size
        patches = x[:, prefix:]  # [B, M, C]
        if self.training:
            state = signals.state.setdefault("dynamicvit", {"decisions": []})
            prev = state.get("policy")
            if prev is None or prev.shape != patches.shape[:2]:
                prev = patches.new_ones(patches.shape[:2])
            log_probs = self.predictor(patches, prev)  # [B, M, 2]
            # Hard sample, soft gradient; D <- D * decision keeps earlier drops.
            keep = F.gumbel_softmax(log_probs, hard=True)[..., 0] * prev  # [B, M]
            state["policy"] = keep
            state["decisions"].append(keep)
            mask = torch.cat([keep.new_ones(b, prefix), keep], dim=1)  # [B, N]
            ar = torch.arange(n, device=x.device).expand(b, n)
            return Reduction(x=x, size=size, index=ar, assign=ar, mask=mask)
        state = signals.state.setdefault("dynamicvit", {"decisions": []})
        k = self.kept(n - prefix, state.setdefault("init_n", n - prefix))
        if k >= n - prefix:
            return identity(x, size)
        # At inference D is all ones: the dropped tokens are gone.
        log_probs = self.predictor(patches, patches.new_ones(patches.shape[:2]))
        return top_k_keep(log_probs[..., 0], x, size, prefix, k)
