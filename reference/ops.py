"""Tensor operations shared by several reference implementations.

What belongs here: small, pure functions on tensors that more than one paper's
module uses and that belong to no paper (ranking, outlier tests, keeping a
per-sample set of tokens). Each is stated in the contract's terms (``Reduction``,
protected prefix tokens) and has one behaviour, so every user gets the same
result. A method's own algorithm stays in its paper's module; a module imports
another paper's module only where that paper builds on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from reference.core import Reduction, Signals, gather_tokens


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


def each_present_sample(
    x: Tensor, size: Tensor, present: Tensor, reduce_one: Callable[[int, Tensor], Reduction]
) -> Reduction:
    """Reduce each sample on its present tokens alone, and pad the results together.

    For a method whose statistics run over all of a sample's tokens (a softmax, a
    quantile), so that the empty slots an earlier reduction padded with change nothing.

    Args:
        x: ``[B, N, C]`` tokens.
        size: ``[B, N, 1]`` token sizes.
        present: ``[B, N]`` bool, False for empty slots (never a prefix token).
        reduce_one: ``reduce_one(i, tokens)`` reduces sample ``i`` restricted to
            ``tokens [N_i]`` (indices into ``x[i]``, in order) and returns the
            ``Reduction`` of that ``[1, N_i, C]`` input.

    Returns:
        A ``Reduction`` over ``x``: each sample's output padded to the largest with
        empty slots (x 0, size 0, index -1, mask 0); ``mask`` is None when no sample
        is padded. Indices refer to ``x``'s own token positions.
    """
    b, n, c = x.shape
    parts = []
    for i in range(b):
        tokens = present[i].nonzero()[:, 0]
        out = reduce_one(i, tokens)
        index = torch.where(out.index[0] >= 0, tokens[out.index[0].clamp_min(0)], -1)
        assign = torch.full((n,), -1, dtype=torch.long, device=x.device)
        assign[tokens] = out.assign[0]
        mask = out.mask[0] if out.mask is not None else out.x.new_ones(out.x.shape[1])
        parts.append((out.x[0], out.size[0], index, assign, mask))
    width = max(p[0].shape[0] for p in parts)
    xs = x.new_zeros(b, width, c)
    sizes = size.new_zeros(b, width, 1)
    index = torch.full((b, width), -1, dtype=torch.long, device=x.device)
    mask = x.new_zeros(b, width)
    for i, (xi, si, ii, _, mi) in enumerate(parts):
        k = xi.shape[0]
        xs[i, :k], sizes[i, :k], index[i, :k], mask[i, :k] = xi, si, ii, mi
    assign = torch.stack([p[3] for p in parts])
    return Reduction(
        x=xs, size=sizes, index=index, assign=assign, mask=None if bool(mask.all()) else mask
    )


def sample_signals(signals: Signals, i: int, tokens: Tensor, state: dict | None = None) -> Signals:
    """``signals`` of sample ``i`` restricted to ``tokens [N_i]`` (for ``each_present_sample``).

    Every per-token signal is sliced; ``state`` replaces the scratch space (default
    empty: a method passes on the entries it reads, sliced as they need).
    """

    def cut(t: Tensor | None, dims: tuple[int, ...]) -> Tensor | None:
        if t is None:
            return None
        t = t[i : i + 1]
        for d in dims:
            t = t.index_select(d, tokens)
        return t

    return replace(
        signals,
        size=cut(signals.size, (1,)),
        keys=cut(signals.keys, (1,)),
        cls_attn=cut(signals.cls_attn, (2,)),
        attn=cut(signals.attn, (2, 3)),
        attn_logits=cut(signals.attn_logits, (2, 3)),
        values=cut(signals.values, (2,)),
        next_q=cut(signals.next_q, (1,)),
        next_k=cut(signals.next_k, (1,)),
        present=None,
        state={} if state is None else state,
    )
