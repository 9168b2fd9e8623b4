"""VisPruner: important tokens by [CLS] attention, plus diverse tokens once duplicates go.

Paper: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning
in VLMs", https://arxiv.org/abs/2412.01818v2 (v1 of that id is FasterVLM)
Official code: https://github.com/Theia-4869/VisPruner
(``llava/model/llava_arch.py``: ``LlavaMetaForCausalLM.encode_images``, with the
selected layer's [CLS] attention row from ``clip_encoder.py``'s ``feature_select``;
read at commit aefa01a)

Algorithm (at the vision layer LLaVA feeds the projector, the penultimate one):
1. Important tokens: the ``int(tokens * important_ratio)`` patches with the most
   head-mean [CLS] attention.
2. Diverse tokens: the rest, in descending attention order, are split alternately
   into two sets A and B; the (at most 8) tokens of A most cosine-similar to some
   token of B are removed, and the survivors of A (by descending similarity) followed
   by B form the next order. Repeat until ``tokens - important`` remain.
3. The projector and the language model see the ``tokens`` selected patches, in
   their original order.

Deviations from the official code:
- Mapping onto the host: a vision-stage ``TokenReducer`` at the LLaVA host's
  selected vision layer (``LlavaHost.apply(vision=...)``), with that layer's [CLS]
  attention row; CLS and every ``prefix`` token are protected and not ranked (the
  host drops CLS afterwards, as the official ``feature_select`` does).
- Per sample: the official selection is batched, but the LLaVA-1.5 path then gathers
  the kept tokens of the whole batch into one sequence (``image_features[index_masks]``);
  here each sample keeps its own tokens. Empty slots an earlier reduction padded with
  (``Signals.present``) are left out.
- Steps the official code cannot run (an odd number of remaining tokens, or more
  tokens to remove than set A holds: both raise a shape mismatch there) remove what
  they can; ``tokens`` at or above the patch count returns the tokens unchanged.
- Left out: the any-resolution (LLaVA-NeXT) and video paths.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from reference.core import (
    Reduction,
    Signals,
    TokenReducer,
    empty_batch,
    gather_tokens,
    identity,
    keep_tokens,
)
from reference.ops import each_present_sample, sample_signals
from reference.registry import register

STEP = 8  # the official cap on tokens removed per matching round


@torch.no_grad()
def vispruner_select(
    features: Tensor, score: Tensor, tokens: int, important_ratio: float
) -> Tensor:
    """Important then diverse tokens of each sample.

    Args:
        features: ``[B, M, C]`` patch features (cosine similarity decides duplicates).
        score: ``[B, M]`` head-mean [CLS] attention of each patch.
        tokens: patches kept, ``0 <= tokens <= M``.
        important_ratio: the share of ``tokens`` taken by attention.

    Returns:
        ``[B, tokens]`` indices into ``M``: important tokens by descending score, then
        the diverse ones in the official order.
    """
    important = int(tokens * important_ratio)
    diverse = tokens - important
    order = score.argsort(dim=1, descending=True)
    kept, residual = order[:, :important], order[:, important:]  # [B, T_imp], [B, R]
    unit = features / features.norm(dim=-1, keepdim=True)
    while diverse > 0:
        r = min(STEP, residual.shape[1] - diverse)
        if r <= 0:
            break
        left = gather_tokens(unit, residual)  # [B, R, C]
        a, b = left[:, ::2], left[:, 1::2]
        duplicate = (a @ b.mT).max(dim=-1).values  # [B, ceil(R / 2)]
        survivors = duplicate.argsort(dim=1, descending=True)[:, r:]
        residual = torch.cat([residual[:, ::2].gather(1, survivors), residual[:, 1::2]], dim=1)
    return torch.cat([kept, residual], dim=1) if diverse > 0 else kept


def vispruner(
    x: Tensor, size: Tensor, cls_attn: Tensor, prefix: int, tokens: int, important_ratio: float
) -> Reduction:
    """Keep the prefix and ``tokens`` patches of ``x [B, N, C]`` (``cls_attn [B, H, N]``)."""
    m = x.shape[1] - prefix
    t = min(tokens, m)
    if t >= m:
        return identity(x, size)
    if x.shape[0] == 0:
        return empty_batch(x, size, prefix + t)
    with torch.no_grad():
        score = cls_attn[:, :, prefix:].mean(dim=1)  # [B, M]
        keep = vispruner_select(x[:, prefix:], score, t, important_ratio) + prefix
    return keep_tokens(x, size, prefix, keep)


@register
class VisPruner(TokenReducer):
    """Keep ``tokens`` patches: a share by [CLS] attention, the rest by removing duplicates."""

    catalog_id = "vispruner"
    kind = "pruning"
    needs = frozenset({"cls_attn"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"tokens": 10**6},
        "some": {"tokens": 6, "important_ratio": 0.5},
    }

    def __init__(self, tokens: int = 128, important_ratio: float = 0.5):
        super().__init__()
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if not 0 <= important_ratio <= 1:
            raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio}")
        self.tokens = tokens
        self.important_ratio = important_ratio

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        return {"vision": cls(tokens=keep)}

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        out = prefix + min(self.tokens, n - prefix)
        return out, out

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        present = signals.present
        if present is not None and x.shape[0] and not bool(present.all()):
            return each_present_sample(
                x,
                signals.size,
                present,
                lambda i, t: self(x[i : i + 1, t], sample_signals(signals, i, t)),
            )
        return vispruner(
            x, signals.size, signals.cls_attn, signals.prefix, self.tokens, self.important_ratio
        )
