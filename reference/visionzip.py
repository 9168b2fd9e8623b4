"""VisionZip: a few dominant image tokens plus a few merged contextual tokens.

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
https://arxiv.org/abs/2412.04467
Official code: https://github.com/dvlab-research/VisionZip
(``visionzip/clip_encoder.py``: ``CLIPVisionTower_VisionZip.forward``;
``visionzip/utils.py``: the keys kept as ``metric``)

Algorithm (at the vision layer LLaVA feeds the projector, the penultimate one):
1. Dominant tokens: keep the ``dominant`` patch tokens that receive the most
   [CLS] attention (summed over heads), in their original order.
2. Contextual tokens: of the remaining tokens (in order), every ``step``-th one
   (``step = max(1, M // contextual)``, the first ``contextual``) is a target;
   every other remaining token goes to the target whose head-averaged attention
   key is most cosine-similar, and each target becomes ``target + mean(assigned)``.
3. The projector and the language model see ``dominant + contextual`` tokens.

Deviations from the official code:
- Mapping onto the host: a vision-stage ``TokenReducer`` at the LLaVA host's
  selected vision layer (``LlavaHost.apply(vision=...)``), with that layer's
  [CLS] attention row and head-averaged keys (the official ``metric``).
- [CLS] token: the official code keeps CLS as the first dominant token and
  feeds it to the language model (``visionzip(model, dominant=54,
  contextual=10)`` gives CLS + 53 patches + 10 contextual = 64 tokens); the host
  drops CLS after this hook, as LLaVA normally does. Here ``dominant`` counts
  patch tokens only: the official setting ``dominant=D`` is ``dominant=D - 1``
  here, and the language model sees one token fewer.
- All ``prefix`` tokens are protected and excluded from both steps (the official
  code has only the CLS token).
- Degenerate budgets the official code does not handle: ``dominant`` and
  ``contextual`` are capped by the tokens left, ``contextual=0`` only prunes (the
  official code divides by zero), and a budget that covers every token returns
  them unchanged and in place (the official code would move the remaining
  tokens behind the dominant ones).
- ``size`` of a contextual token is the sum of the sizes it absorbed, though its
  value is ``target + mean(assigned)`` as in the official code, not a
  size-weighted mean (the official code has no sizes).
- Left out: the optional projector fine-tuning (the paper's VisionZip‡), the
  any-resolution (LLaVA-NeXT), Mini-Gemini and video paths, and the paper's
  variant for encoders without a [CLS] token. The score computation runs under
  ``torch.no_grad()``; the merge itself is differentiable in ``x``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, gather_tokens, identity, keep_tokens
from reference.registry import register


def counts(n: int, prefix: int, dominant: int, contextual: int) -> tuple[int, int]:
    """Dominant and contextual tokens actually produced from ``n`` tokens."""
    d = min(dominant, n - prefix)
    return d, min(contextual, n - prefix - d)


def visionzip_compress(
    x: Tensor,
    size: Tensor,
    cls_attn: Tensor,
    keys: Tensor,
    prefix: int,
    dominant: int,
    contextual: int,
) -> Reduction:
    """Keep ``dominant`` tokens of ``x`` by [CLS] attention; merge the rest into ``contextual``.

    Args:
        x: ``[B, N, C]`` vision features at the selected layer.
        size: ``[B, N, 1]`` token sizes.
        cls_attn: ``[B, H, N]`` attention of the CLS query to every token.
        keys: ``[B, N, D]`` attention keys averaged over heads (the similarity metric).
        prefix: protected tokens at the front.
        dominant: patch tokens kept by [CLS] attention.
        contextual: merged tokens made from the rest.

    Returns:
        A ``Reduction``: prefix, dominant tokens (original order), contextual
        tokens (in target order; ``index`` is the target they continue).
    """
    b, n, _ = x.shape
    m = n - prefix
    dominant, contextual = counts(n, prefix, dominant, contextual)
    if dominant + contextual >= m:
        return identity(x, size)
    rest = m - dominant
    with torch.no_grad():
        score = cls_attn[:, :, prefix:].sum(dim=1)  # [B, M]
        top = score.topk(dominant, dim=1).indices  # [B, Nd]
        is_dominant = torch.zeros_like(score, dtype=torch.bool).scatter(1, top, True)
        # The remaining tokens in their original order (a stable sort puts them first).
        remaining = is_dominant.to(torch.int8).argsort(dim=1, stable=True)[:, :rest] + prefix
    kept = keep_tokens(x, size, prefix, top + prefix)
    if contextual == 0:
        return kept

    # Targets: uniformly spaced over the remaining tokens, the same slots in every sample.
    step = max(1, rest // contextual)
    is_target = torch.zeros(rest, dtype=torch.bool, device=x.device)
    is_target[torch.arange(0, rest, step, device=x.device)[:contextual]] = True
    target_idx, other_idx = remaining[:, is_target], remaining[:, ~is_target]  # [B, K], [B, O]
    with torch.no_grad():
        metric = keys / keys.norm(dim=-1, keepdim=True)
        similarity = gather_tokens(metric, other_idx) @ gather_tokens(metric, target_idx).mT
        choice = similarity.argmax(dim=-1)  # [B, O]: the target each token merges into
    one_hot = F.one_hot(choice, contextual).to(x.dtype).mT  # [B, K, O]
    n_assigned = one_hot.sum(dim=-1, keepdim=True).clamp(min=1)  # [B, K, 1]
    merged = gather_tokens(x, target_idx) + one_hot @ gather_tokens(x, other_idx) / n_assigned
    merged_size = gather_tokens(size, target_idx) + one_hot.to(size.dtype) @ gather_tokens(
        size, other_idx
    )

    base = kept.num_tokens
    slots = base + torch.arange(contextual, device=x.device).expand(b, -1)  # [B, K]
    assign = kept.assign.scatter(1, target_idx, slots).scatter(1, other_idx, base + choice)
    return Reduction(
        x=torch.cat([kept.x, merged], dim=1),
        size=torch.cat([kept.size, merged_size], dim=1),
        index=torch.cat([kept.index, target_idx], dim=1),
        assign=assign,
    )


@register
class VisionZip(TokenReducer):
    """Keep ``dominant`` patch tokens by [CLS] attention and merge the rest into ``contextual``."""

    catalog_id = "visionzip"
    kind = "pruning"
    needs = frozenset({"cls_attn", "keys"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"dominant": 10**6, "contextual": 0},
        "some": {"dominant": 5, "contextual": 3},
    }

    def __init__(self, dominant: int = 10**6, contextual: int = 0):
        super().__init__()
        if dominant < 0:
            raise ValueError(f"dominant must be >= 0, got {dominant}")
        if contextual < 0:
            raise ValueError(f"contextual must be >= 0, got {contextual}")
        self.dominant = dominant
        self.contextual = contextual

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        # The paper's LLaVA-1.5 splits: 54 + 10, 108 + 20, 162 + 30 (official counts
        # include CLS, which this host drops, so the dominant patches take its place).
        contextual = {64: 10, 128: 20, 192: 30}.get(keep, round(keep * 10 / 64))
        return {"vision": cls(dominant=keep - contextual, contextual=contextual)}

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        d, c = counts(n, prefix, self.dominant, self.contextual)
        out = prefix + d + c
        return out, out

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        return visionzip_compress(
            x,
            signals.size,
            signals.cls_attn,
            signals.keys,
            signals.prefix,
            self.dominant,
            self.contextual,
        )
