"""TRIM: Token Reduction using CLIP Metric.

Paper: "Less is More: A Simple yet Effective Token Reduction Method for Efficient
Multi-modal LLMs", https://arxiv.org/abs/2409.10994
Official code: https://github.com/FreedomIntelligence/TRIM
(``llava/model/multimodal_encoder/clip_encoder.py``: ``CLIPVisionTower.token_reduction``)

Algorithm (applied to the CLIP features that feed LLaVA's projector):
1. Score every image patch against the CLIP text embedding of the question: a dot
   product, then a softmax over the patches of each image.
2. Keep the patches whose score is an upper outlier by the interquartile range,
   ``score > Q3 + 1.5 * IQR`` (or a fixed fraction of the patches).
3. Append one aggregated token, the plain mean of every patch that was not kept;
   the kept patches stay in their spatial order. The LLM is then instruction-tuned
   with this reduction in place (79% fewer image tokens on LLaVA-1.5).

Deviations from the official code:
- Text features: the caller gives ``signals.state["text"]`` ``[B, T, C]`` already
  in the vision feature space; their mean over ``T`` stands in for CLIP's pooled
  text embedding, and the patches are not passed through CLIP's ``post_layernorm``
  and ``visual_projection`` (the host has no CLIP projection). Without
  ``state["text"]`` (the plain ViT host) the CLS token is used as the query.
- Sign: as in the released code, the score is ``softmax(-<patch, text>)`` (the
  code negates the similarity before the softmax; the paper's text speaks of
  similarity); ``negate=False`` ranks by the similarity itself.
- Hook: on the LLaVA host it runs on the selected vision layer's output (where the
  official ``feature_select`` reads); on the ViT host ``"pre"`` of a block, i.e.
  the previous block's output. The CLS/prefix tokens are protected.
- Per image, not per batch: the official code pools the scores of the whole batch
  into one IQR (one count for all images). Here every image gets its own count;
  the batch is padded to the largest count with that image's best-scoring
  dropped patches after its aggregated token (``Reduction.mask`` 0 marks them;
  their ``index`` is -1, since each of those patches went into the aggregated
  token). A batch of equal counts has no filler. The hosts leave the filler out of
  attention, and a later TRIM step scores each image on its own present tokens
  (``Signals.present``).
- The kept count is the number of outliers itself (the official code rounds
  ``int(N * count / N)``, which float error can lower by one). With every patch
  kept there is no aggregated token (the official code would index past the end).
- Scores are computed in float32. Training (LLaVA-1.5 instruction tuning with
  TRIM in place) is left out; the reduction itself has no parameters.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, gather_tokens, identity
from reference.ops import each_present_sample, iqr_outliers
from reference.registry import register


def text_scores(patches: Tensor, text: Tensor, negate: bool = True) -> Tensor:
    """CLIP-metric scores of ``patches [B, M, C]`` against ``text [B, T, C]``.

    Returns:
        ``[B, M]`` float32 softmax over the patches of ``-<patch, text>``
        (``<patch, text>`` when ``negate`` is False); ``text`` is mean-pooled over T.
    """
    query = text.float().mean(dim=1)  # [B, C]
    sim = (patches.float() @ query.unsqueeze(-1)).squeeze(-1)  # [B, M]
    return (-sim if negate else sim).softmax(dim=-1)


def trim_reduce(
    x: Tensor, size: Tensor, text: Tensor, prefix: int, ratio: float | None, negate: bool = True
) -> Reduction:
    """Keep the prefix, the text-selected patches and one aggregated token of ``x [B, N, C]``.

    Args:
        x: ``[B, N, C]`` vision features.
        size: ``[B, N, 1]`` token sizes.
        text: ``[B, T, C]`` text features in the same space.
        prefix: protected tokens at the front.
        ratio: fraction of the patches to keep, or None for the IQR rule.
        negate: rank by ``-similarity`` as the official code does.

    Returns:
        A ``Reduction``: prefix, kept patches in spatial order, the aggregated token
        (``index == -1``), then filler patches (``mask`` 0, ``index == -1``: each
        copies a patch that went into the aggregated token) up to the batch maximum.
    """
    b, n, _ = x.shape
    m = n - prefix
    device = x.device
    with torch.no_grad():
        score = text_scores(x[:, prefix:], text, negate)  # [B, M]
        if ratio is None:
            count = iqr_outliers(score).sum(dim=1)  # [B]
        else:
            count = torch.full((b,), int(m * ratio), device=device)
        count = count.clamp(max=m)
        if bool((count >= m).all()):
            return identity(x, size)
        order = score.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(m, device=device).expand(b, m)
        )
        kept = rank < count.unsqueeze(1)  # [B, M] the top-``count`` patches
        has_agg = count < m  # [B]
        # Sort keys over a bank of M patches + 1 aggregated token: kept patches by
        # position, then the aggregated token, then fillers by descending score.
        pos = torch.arange(m, device=device).expand(b, m)
        key_patch = torch.where(kept, pos, m + 1 + rank)
        key_agg = torch.where(has_agg, m, 2 * m + 1).unsqueeze(1)
        sel = torch.cat([key_patch, key_agg], 1).argsort(dim=1, stable=True)
        real_count = count + has_agg.long()
        width = int(real_count.max())
        sel = sel[:, :width]  # [B, W] bank entries in output order
        real = torch.arange(width, device=device) < real_count.unsqueeze(1)  # [B, W]

    # The aggregated token: the plain mean of the patches that were not kept.
    dropped = (~kept).unsqueeze(-1)  # [B, M, 1]
    n_dropped = dropped.sum(dim=1).clamp(min=1)  # [B, 1]
    agg = ((x[:, prefix:].float() * dropped).sum(dim=1) / n_dropped).to(x.dtype)  # [B, C]
    agg_size = (size[:, prefix:] * dropped).sum(dim=1, keepdim=True)  # [B, 1, 1]
    bank = torch.cat([x[:, prefix:], agg.unsqueeze(1)], 1)  # [B, M + 1, C]
    bank_size = torch.cat([size[:, prefix:], agg_size], 1)

    pre = torch.arange(prefix, device=device).expand(b, prefix)
    # A filler continues no input token: the patch it copies went into the aggregated token.
    created = (sel == m) | ~real
    index = torch.cat([pre, torch.where(created, -1, sel + prefix)], 1)  # [B, prefix + W]
    slots = torch.arange(index.shape[1], device=device).expand(b, -1)
    assign = torch.full((b, n + 1), -1, dtype=torch.long, device=device)
    assign.scatter_(1, torch.where(index < 0, n, index), slots)  # column n absorbs the -1s
    assign = assign[:, :n]
    agg_slot = (prefix + count).unsqueeze(1).expand(b, m)
    patch_assign = torch.where(~kept & has_agg.unsqueeze(1), agg_slot, assign[:, prefix:])
    assign = torch.cat([assign[:, :prefix], patch_assign], 1)

    mask = None
    if bool((real_count < width).any()):
        mask = torch.cat([torch.ones_like(pre, dtype=torch.bool), real], 1).to(x.dtype)
    return Reduction(
        x=torch.cat([x[:, :prefix], gather_tokens(bank, sel)], 1),
        size=torch.cat([size[:, :prefix], gather_tokens(bank_size, sel)], 1),
        index=index,
        assign=assign,
        mask=mask,
    )


@register
class TRIM(TokenReducer):
    """Keep the patches whose CLIP text score is an IQR outlier, plus one mean token."""

    catalog_id = "trim"
    kind = "pruning"
    needs = frozenset()
    where = "pre"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"ratio": 1.0},
        "some": {"ratio": None},
    }

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        # The fixed-share variant (the paper's IQR rule adapts the count per image);
        # the averaged token of the pruned patches comes on top.
        return {"vision": cls(ratio=keep / n_image)}

    def __init__(self, ratio: float | None = None, negate: bool = True):
        """``ratio``: fraction of the patches to keep; None: the paper's IQR rule."""
        super().__init__()
        if ratio is not None and not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1] or None, got {ratio}")
        self.ratio = ratio
        self.negate = negate

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        m = n - prefix
        if self.ratio is None:
            # Only values above the linearly interpolated Q3 can be outliers.
            return (prefix + 1, prefix + math.ceil((m - 1) / 4) + 1) if m > 0 else (n, n)
        k = int(m * self.ratio)
        return (n, n) if k >= m else (prefix + k + 1, prefix + k + 1)

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        text = signals.state.get("text")
        if text is None:
            text = x[:, :1]  # no question given: the CLS token is the query
        if x.shape[1] == signals.prefix:  # no patch to select
            return identity(x, signals.size)
        if x.shape[0] == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(x.shape[1], signals.prefix)[0])
        present = signals.present
        if present is not None and not bool(present.all()):  # after an earlier padded step
            return each_present_sample(
                x,
                signals.size,
                present,
                lambda i, t: trim_reduce(
                    x[i : i + 1, t],
                    signals.size[i : i + 1, t],
                    text[i : i + 1],
                    signals.prefix,
                    self.ratio,
                    self.negate,
                ),
            )
        return trim_reduce(x, signals.size, text, signals.prefix, self.ratio, self.negate)
