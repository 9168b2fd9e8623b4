"""Tensor operations shared by several reference implementations.

What belongs here: small, pure functions on tensors that more than one paper's
module uses and that belong to no paper (ranking, outlier tests, keeping a
per-sample set of tokens). Each is stated in the contract's terms (``Reduction``,
protected prefix tokens) and has one behaviour, so every user gets the same
result. A method's own algorithm stays in its paper's module; a module imports
another paper's module only where that paper builds on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference.core import Reduction, gather_tokens


def descending_rank(score: Tensor) -> Tensor:
    """Rank of each score within its row.

    Args:
        score: ``[B, M]`` scores.

    Returns:
        ``[B, M]`` ranks, 0 for the largest score of the row.
    """
    order = score.argsort(dim=1, descending=True)
    ar = torch.arange(score.shape[1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ar)


def iqr_outliers(score: Tensor) -> Tensor:
    """Upper outliers of each row by the interquartile-range rule.

    Args:
        score: ``[B, M]`` scores (any floating dtype; quantiles run in fp32, or fp64).

    Returns:
        ``[B, M]`` bool, True where ``score > Q3 + 1.5 * (Q3 - Q1)`` of its own row.
    """
    score = score if score.dtype == torch.float64 else score.float()  # quantile: fp32/64 only
    q = torch.quantile(score, score.new_tensor([0.25, 0.75]), dim=1)  # [2, B]
    upper = q[1] + 1.5 * (q[1] - q[0])  # [B]
    return score > upper.unsqueeze(1)


def cap_keep(keep: Tensor, priority: Tensor, max_keep: float, present: Tensor) -> Tensor:
    """Restrict a keep mask to a fraction of each row's present tokens.

    Args:
        keep: ``[B, M]`` bool, the tokens a method would keep.
        priority: ``[B, M]`` scores; the highest kept ones survive the cap.
        max_keep: at most ``floor(max_keep * present.sum(1))`` tokens per row (>= 1: off).
        present: ``[B, M]`` bool, False for empty (padding) slots.

    Returns:
        ``[B, M]`` bool, ``keep`` with the lowest-priority tokens beyond the cap dropped.
    """
    if max_keep >= 1:
        return keep
    cap = (max_keep * present.sum(dim=1, keepdim=True).double()).floor()  # [B, 1], as int()
    order = torch.where(keep, priority, -torch.inf).argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)  # [B, M] position of each token in that order
    return keep & (rank < cap)


def keep_padded(x: Tensor, size: Tensor, prefix: int, keep: Tensor) -> Reduction:
    """Keep the prefix and, per sample, the non-prefix tokens where ``keep`` is True.

    Samples keep different counts; each is padded to the batch maximum with empty
    slots (x 0, size 0, index -1, mask 0) placed after its own kept tokens, which
    stay in their original order.

    Args:
        x: ``[B, N, C]`` tokens.
        size: ``[B, N, 1]`` token sizes.
        prefix: protected tokens at the front.
        keep: ``[B, N - prefix]`` bool over the non-prefix tokens.

    Returns:
        A ``Reduction`` of ``prefix + K`` tokens, ``K`` the largest kept count; ``mask``
        is None when no sample is padded.
    """
    b, n, _ = x.shape
    m = n - prefix
    counts = keep.sum(dim=1)  # [B]
    k = int(counts.max()) if b else 0
    ar = torch.arange(m, device=x.device)
    # Kept tokens sort before dropped ones; within each group the order is spatial.
    order = torch.where(keep, ar, ar + m).argsort(dim=1)[:, :k] + prefix  # [B, K]
    valid = torch.arange(k, device=x.device) < counts[:, None]  # [B, K]
    src = torch.cat([torch.arange(prefix, device=x.device).expand(b, prefix), order], 1)
    ok = torch.cat([valid.new_ones(b, prefix), valid], dim=1)  # [B, prefix + K]
    out = gather_tokens(x, src).masked_fill(~ok[..., None], 0)
    out_size = gather_tokens(size, src).masked_fill(~ok[..., None], 0)
    # Empty slots write into a spare last column, which is cut off.
    assign = torch.full((b, n + 1), -1, dtype=torch.long, device=x.device)
    slots = torch.arange(src.shape[1], device=x.device).expand(b, -1)
    assign.scatter_(1, torch.where(ok, src, n), slots)
    mask = None if bool(valid.all()) else ok.to(x.dtype)
    return Reduction(
        x=out, size=out_size, index=src.masked_fill(~ok, -1), assign=assign[:, :n], mask=mask
    )


def keep_image_tokens(
    h: Tensor, size: Tensor | None, start: int, image_len: int, keep: Tensor
) -> Reduction:
    """Keep every token outside an image span and the span's tokens at ``keep``.

    Args:
        h: ``[B, N, C]`` hidden states of the sequence.
        size: ``[B, N, 1]`` token sizes, or None for all ones.
        start: first position of the image span.
        image_len: length of the image span.
        keep: ``[B, K]`` kept image tokens, 0-based within the span (any order).

    Returns:
        A ``Reduction`` of ``N - image_len + K`` tokens; kept image tokens in their
        original order.
    """
    b, n, _ = h.shape
    device = h.device
    before = torch.arange(start, device=device).expand(b, -1)
    after = torch.arange(start + image_len, n, device=device).expand(b, -1)
    index = torch.cat([before, start + keep.sort(1).values, after], 1)  # [B, N']
    assign = torch.full((b, n), -1, dtype=torch.long, device=device)
    assign.scatter_(1, index, torch.arange(index.shape[1], device=device).expand(b, -1))
    size = torch.ones(b, n, 1, dtype=h.dtype, device=device) if size is None else size
    return Reduction(
        x=gather_tokens(h, index), size=gather_tokens(size, index), index=index, assign=assign
    )
