"""ATS: Adaptive Token Sampling.

Paper: "Adaptive Token Sampling For Efficient Vision Transformers",
https://arxiv.org/abs/2111.15667
Official code: https://github.com/adaptivetokensampling/ATS
(``libs/models/transformers/ats_block.py``: ``AdaptiveTokenSampler``)

Algorithm (parameter-free, per image):
1. Significance score of image token j: the CLS attention to it (summed over
   heads) times the norm of its value vector, normalized over the image tokens.
2. Sort the scores ascending and build their cumulative distribution (CDF),
   min-max normalized to [0, 1].
3. Inverse transform sampling: ``K`` evenly spaced levels on the CDF axis each
   pick the token whose CDF is nearest; duplicates collapse, so an image keeps
   at most ``K`` tokens, fewer when its scores are peaked (adaptive count).
   As in the official code, ``K`` is the initial image-token count (196 for 197
   tokens) at every ATS block, and the scores use the official attention, which
   adds ``1e-6 / N`` to every probability (``softmax_with_policy``, ``eps``).

Deviations from the official code:
- Hook: ``"mid"``. The official sampler drops the attention rows of unsampled
  tokens before ``attn @ v``; removing those tokens right after the attention is
  the same computation (their rows are computed and discarded).
- ``k``: the official budget ``n_tokens`` less the CLS token. With ``k`` at least
  the current image count the official path runs: ``K`` is the image count at the
  first ATS block of this forward (kept in ``signals.state``), as the official
  ``n_ref_tokens - 1``. The released code crashes when ``n_tokens`` is below the
  current token count (an ``expand`` of ``N - 1`` picks to ``n_tokens - 1`` rows);
  there ``k`` CDF levels are drawn instead, so at most ``k`` image tokens are kept,
  as in the paper. The official floor of 8 tokens is not reproduced (tiny test
  inputs have 16 tokens).
- The host computes the attention output with its own softmax; only the scores
  use the official ``+ 1e-6 / N``, rebuilt from the CLS probabilities.
- Batches: the official code zero-pads every image to the batch maximum and
  masks the padding out of later attention (``policy``). Here each image is
  padded with its highest-scoring *unsampled* real tokens, after its sampled
  ones; ``Reduction.mask`` marks them 0 and the hosts mask them out of attention,
  so the other tokens see what they would see alone.
  A batch of one (or of equal counts) has no filler and ``mask`` is None.
- Scores and the CDF are computed in float32 whatever the input dtype, so
  bfloat16 does not collapse nearby CDF levels.
- All ``prefix`` tokens are protected and excluded from the scores.
- Kept tokens are returned in spatial order (the official code sorts them by
  score), and keep their ``size``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, gather_tokens, identity
from reference.registry import register


def significance_scores(cls_attn: Tensor, values: Tensor, prefix: int, eps: float = 0.0) -> Tensor:
    """Normalized significance ``S_j = A_cls,j * ||v_j|| / sum_i A_cls,i * ||v_i||``.

    Args:
        cls_attn: ``[B, H, N]`` attention of the CLS query.
        values: ``[B, H, N, D]`` attention values.
        eps: the official ``softmax_with_policy`` term: with ``e = exp(a - max a)`` it
            gives ``(e + eps / N) / (sum e + eps)``, i.e. ``(p + eps p_max / N) /
            (1 + eps p_max)`` in terms of the probabilities ``p`` (``sum e = 1 / p_max``).

    Returns:
        ``[B, N - prefix]`` float32 scores that sum to one per image.
    """
    attn = cls_attn.float()  # [B, H, N]
    if eps:
        p_max = attn.amax(dim=-1, keepdim=True)
        attn = (attn + eps * p_max / attn.shape[-1]) / (1 + eps * p_max)
    attn = attn.sum(dim=1)  # [B, N]
    # 'b h n d -> b n (h d)': the norm of the full value vector, all heads together
    v_norm = values.float().transpose(1, 2).flatten(2).norm(dim=-1)  # [B, N]
    score = (attn * v_norm)[:, prefix:]
    return score / score.sum(dim=1, keepdim=True).clamp_min(torch.finfo(score.dtype).tiny)


def inverse_transform_sampling(score: Tensor, k: int) -> Tensor:
    """Tokens picked by ``k`` evenly spaced levels of the score CDF.

    Args:
        score: ``[B, M]`` significance scores.
        k: number of CDF levels (at most ``k`` distinct tokens are picked).

    Returns:
        ``[B, M]`` boolean mask of the sampled tokens.
    """
    sorted_score, order = score.sort(dim=1)  # ascending, as in the paper's CDF
    cdf = sorted_score.cumsum(dim=1)  # [B, M]
    lo, hi = cdf[:, :1], cdf[:, -1:]
    cdf = (cdf - lo) / (hi - lo).clamp_min(torch.finfo(cdf.dtype).eps)
    # Levels run from the smallest positive CDF value up to 1 (official create_ys),
    # so the least significant token (CDF 0) is never picked.
    start = torch.where(cdf > 0, cdf, torch.inf).min(dim=1, keepdim=True).values
    start = torch.where(torch.isfinite(start), start, torch.ones_like(start))
    steps = torch.linspace(0, 1, k, device=score.device, dtype=cdf.dtype)
    if k == 1:
        steps = torch.ones_like(steps)  # a single level takes the most significant token
    levels = start + (1 - start) * steps  # [B, k]
    # Nearest CDF value for each level; ties go to the lower index (argmin).
    picked = (levels.unsqueeze(2) - cdf.unsqueeze(1)).abs().argmin(dim=2)  # [B, k]
    hit = torch.zeros_like(cdf, dtype=torch.bool).scatter(1, picked, True)  # sorted order
    return torch.zeros_like(hit).scatter(1, order, hit)  # original order


def adaptive_token_sampling(
    x: Tensor,
    size: Tensor,
    cls_attn: Tensor,
    values: Tensor,
    prefix: int,
    k: int,
    eps: float = 0.0,
) -> Reduction:
    """Keep the prefix and the image tokens ATS samples from ``x [B, N, C]``.

    ``k`` CDF levels (may exceed the image count, as the official initial count does);
    ``eps`` as in ``significance_scores``. Each image keeps its own number of sampled
    tokens; the batch is padded to the largest count with that image's best unsampled
    tokens (``mask`` 0).
    """
    b, n, _ = x.shape
    m = n - prefix
    if m <= 1:
        return identity(x, size)
    with torch.no_grad():
        score = significance_scores(cls_attn, values, prefix, eps)  # [B, M]
        sampled = inverse_transform_sampling(score, k)  # [B, M]
        count = sampled.sum(dim=1)  # [B]
        width = int(count.max())
        # Order: sampled tokens by position, then fillers by descending score.
        rank = torch.empty_like(score, dtype=torch.long).scatter_(
            1, score.argsort(dim=1), torch.arange(m, device=x.device).expand(b, m)
        )  # ascending rank of each token
        pos = torch.arange(m, device=x.device).expand(b, m)
        key = torch.where(sampled, pos, 2 * m - 1 - rank)
        sel = key.argsort(dim=1)[:, :width]  # [B, width]
    pre = torch.arange(prefix, device=x.device).expand(b, prefix)
    index = torch.cat([pre, sel + prefix], dim=1)  # [B, prefix + width]
    assign = torch.full((b, n), -1, dtype=torch.long, device=x.device)
    assign.scatter_(1, index, torch.arange(index.shape[1], device=x.device).expand(b, -1))
    mask = None
    if bool((count < width).any()):
        keep = torch.cat([torch.ones_like(pre, dtype=torch.bool), sampled.gather(1, sel)], 1)
        mask = keep.to(x.dtype)
    return Reduction(
        x=gather_tokens(x, index),
        size=gather_tokens(size, index),
        index=index,
        assign=assign,
        mask=mask,
    )


@register
class ATS(TokenReducer):
    """Adaptive token sampling with at most ``k`` image tokens (``None``: off)."""

    catalog_id = "ats"
    kind = "pruning"
    needs = frozenset({"cls_attn", "values"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {"zero": {"k": None}, "some": {"k": 8}}

    def __init__(self, k: int | float | None = None, eps: float = 1e-6):
        """``k``: at most this many image tokens, or a fraction of them if a float <= 1
        (at least the current count: the official path); ``eps``: the official
        ``softmax_with_policy`` term in the scores (0 for the plain softmax)."""
        super().__init__()
        if k is not None and not k > 0:
            raise ValueError(f"k must be a count >= 1, a fraction in (0, 1] or None, got {k}")
        self.k = k
        self.eps = eps

    def levels(self, m: int) -> int | None:
        if self.k is None:
            return None
        if isinstance(self.k, float) and self.k <= 1:
            return max(1, round(self.k * m))
        return max(1, min(int(self.k), m))

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        k = self.levels(n - prefix)
        if k is None or n - prefix <= 1:
            return n, n
        return prefix + 1, prefix + k

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        m = x.shape[1] - signals.prefix
        k = self.levels(m)
        if k is None:
            return identity(x, signals.size)
        if x.shape[0] == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(x.shape[1], signals.prefix)[0])
        n_ref = signals.state.setdefault("ats_init_n", m)
        if k >= m:  # the official path: as many levels as the initial image count
            k = max(n_ref, m)
        return adaptive_token_sampling(
            x, signals.size, signals.cls_attn, signals.values, signals.prefix, k, self.eps
        )
