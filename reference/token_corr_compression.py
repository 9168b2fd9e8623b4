"""Token-level Correlation-guided Compressor (TokenCorrCompressor).

Paper: "Token-level Correlation-guided Compression for Efficient Multimodal
Document Understanding", https://arxiv.org/abs/2407.14439
Official code: https://github.com/JiuTian-VL/TokenCorrCompressor (the repository
holds only a README and a figure: "The codes will be released soon").

Algorithm (per sub-image of a cropping document MLLM, Sec. 3):
1. Patch-patch correlation: cosine similarity of the patch tokens' attention keys.
   A patch with more than ``limit`` highly similar patches (similarity above
   ``threshold``) repeats a pattern and is redundant; the redundant fraction ``r``
   gives the information density ``1 - r`` and the sub-image keeps
   ``ceil((1 - r) M)`` of its ``M`` patches.
2. Global information: the patches whose [CLS] attention (a deep layer) is an
   upper outlier by the IQR rule (``> Q3 + 1.5 IQR``) are always kept.
3. Local information: the rest of the budget is sampled without replacement with
   probabilities proportional to a shallow layer's [CLS] attention.

Deviations from the paper:
- Basis: no official code exists; this follows the paper's description as
  summarised by secondary sources (the full method section could not be read
  here). The per-token redundancy rule in step 1 and the default ``threshold`` /
  ``limit`` are our reading, not values recovered from the paper.
- Hook: one layer (the LLaVA host's vision hook, or a ViT block's ``"mid"``).
  Its head-averaged keys give the patch-patch correlation and its CLS attention
  (averaged over heads) both the global outliers and, unless the caller provides
  a shallow layer's CLS attention as ``signals.state["local_attn"] [B, N]``, the
  local sampling distribution; the paper reads the two from different depths.
- Sampling is Gumbel-top-k (equivalent to sampling without replacement in
  proportion to the attention) with noise drawn from a generator seeded by
  ``seed``, so a run is reproducible and an image's result does not depend on its
  batch; ``sample=False`` takes the local top-k instead.
- ``max_keep`` (default 1.0, i.e. off) caps the kept fraction of patches; it is
  not in the paper and gives ``budget`` an upper bound below ``n``.
- Batches: each image (one sub-image) keeps its own count; the batch is padded to
  the largest count with empty slots (x 0, size 0, index -1, ``Reduction.mask``
  0) after each image's own tokens (``reference.ops.keep_padded``). The official
  integration in mPLUG-DocOwl1.5 (cropping, the global thumbnail, the H-Reducer
  that follows) is not modelled. The hosts leave empty slots out of attention
  (the LLaVA host marks them as padding), and a later step of this method scores
  each image on its own present tokens (``Signals.present``).
- Prefix tokens (CLS) are kept and excluded from every statistic.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity
from reference.ops import each_present_sample, iqr_outliers, keep_padded, sample_signals
from reference.registry import register


def information_density(keys: Tensor, threshold: float, limit: int) -> Tensor:
    """``1 - r`` per image, ``r`` the fraction of redundant patches (Sec. 3.1).

    Args:
        keys: ``[B, M, D]`` attention keys of the patch tokens.
        threshold: cosine similarity above which two patches repeat a pattern.
        limit: a patch with more than ``limit`` such partners is redundant.

    Returns:
        ``[B]`` float32 density in ``[0, 1]``.
    """
    with torch.no_grad():
        k = F.normalize(keys.float(), dim=-1)
        sim = (k @ k.transpose(-1, -2)).clamp(-1, 1)  # [B, M, M]
        eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
        partners = ((sim > threshold) & ~eye).sum(dim=-1)  # [B, M]
        return 1 - (partners > limit).float().mean(dim=-1)


def select(counts: Tensor, outliers: Tensor, local: Tensor, sample: bool, seed: int) -> Tensor:
    """``[B, M]`` keep mask: the outliers first, then the local choice, ``counts`` in all.

    ``local [B, M]`` is the sampling distribution (any positive scale); with
    ``sample`` the choice is Gumbel-top-k of ``log(local)`` (sampling without
    replacement), the same noise row for every image.
    """
    b, m = local.shape
    key = local.float().clamp_min(1e-30).log()  # [B, M]
    if sample:
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(m, generator=gen).clamp(1e-10, 1 - 1e-7).to(local.device)
        key = key - (-u.log()).log()  # + Gumbel(0, 1)
    # Rank: outliers before the rest; within each group by key (two stable sorts).
    order = key.argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, (~outliers.gather(1, order)).int().argsort(dim=1, stable=True))
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(m, device=local.device).expand(b, m)
    )
    return rank < counts[:, None]


@register
class TokenCorrCompression(TokenReducer):
    """Keep each image's information-density share of patches, chosen by [CLS] correlation."""

    catalog_id = "token_corr_compression"
    kind = "pruning"
    needs = frozenset({"keys", "cls_attn"})
    basis = "secondary summaries of the paper text (no official code released)"
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"threshold": 1.0},
        "some": {"threshold": 0.3, "limit": 2, "max_keep": 0.75},
    }

    def __init__(
        self,
        threshold: float = 0.8,
        limit: int = 4,
        sample: bool = True,
        seed: int = 0,
        max_keep: float = 1.0,
    ):
        super().__init__()
        if not 0 < max_keep <= 1:
            raise ValueError(f"max_keep must be in (0, 1], got {max_keep}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.threshold, self.limit = threshold, limit
        self.sample, self.seed, self.max_keep = sample, seed, max_keep

    def cap(self, m: int) -> int:
        return max(1, math.floor(self.max_keep * m))

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        if n == prefix:
            return n, n
        return prefix + 1, prefix + self.cap(n - prefix)

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        prefix = signals.prefix
        m = x.shape[1] - prefix
        if m == 0:  # no patch to select
            return identity(x, signals.size)
        if x.shape[0] == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(x.shape[1], prefix)[0])
        present = signals.present
        if present is not None and not bool(present.all()):  # after an earlier padded step
            local = signals.state.get("local_attn")

            def one(i: int, t: Tensor) -> Reduction:
                state = {} if local is None else {"local_attn": local[i : i + 1, t]}
                return self(x[i : i + 1, t], sample_signals(signals, i, t, state))

            return each_present_sample(x, signals.size, present, one)
        with torch.no_grad():
            density = information_density(signals.keys[:, prefix:], self.threshold, self.limit)
            counts = (density * m - 1e-4).ceil().long().clamp(1, self.cap(m))  # [B]
            if bool((counts == m).all()):
                return identity(x, signals.size)
            cls_attn = signals.cls_attn.float().mean(1)[:, prefix:]  # [B, M]
            local = signals.state.get("local_attn")
            local = cls_attn if local is None else local[:, prefix:]
            keep = select(counts, iqr_outliers(cls_attn), local, self.sample, self.seed)
        return keep_padded(x, signals.size, prefix, keep)
