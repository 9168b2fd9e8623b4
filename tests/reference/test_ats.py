"""ATS's own invariants: significance scores, inverse transform sampling, adaptive count."""

from __future__ import annotations

import torch

from reference.ats import ATS, inverse_transform_sampling, significance_scores
from tests.reference.conftest import B, N, make_signals, tokens


def sample_one(score: torch.Tensor, k: int) -> set[int]:
    """Plain-Python inverse transform sampling of one image (the paper's recipe)."""
    order = sorted(range(len(score)), key=lambda j: (score[j].item(), j))
    cdf, total = [], 0.0
    for j in order:
        total += score[j].item()
        cdf.append(total)
    cdf = [(c - cdf[0]) / (cdf[-1] - cdf[0]) for c in cdf]
    start = min(c for c in cdf if c > 0)
    picked = set()
    for i in range(k):
        level = start + (1 - start) * i / (k - 1)
        nearest = min(range(len(cdf)), key=lambda p: (abs(level - cdf[p]), p))
        picked.add(order[nearest])
    return picked


def test_scores_are_cls_attention_times_value_norm():
    x = tokens()
    s = make_signals(x)
    score = significance_scores(s.cls_attn, s.values, prefix=1)
    raw = s.cls_attn.sum(1)[:, 1:] * s.values.transpose(1, 2).flatten(2).norm(dim=-1)[:, 1:]
    torch.testing.assert_close(score, raw / raw.sum(1, keepdim=True))


def test_sampled_set_matches_a_plain_inverse_transform_sampler():
    score = torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) ** 3
    score = score / score.sum(1, keepdim=True)
    mask = inverse_transform_sampling(score, 8)
    for i in range(score.shape[0]):
        assert set(mask[i].nonzero().flatten().tolist()) == sample_one(score[i], 8)


def test_kept_tokens_are_the_sampled_ones_and_always_include_the_most_significant():
    x = tokens()
    s = make_signals(x)
    out = ATS(k=8)(x, s)
    score = significance_scores(s.cls_attn, s.values, prefix=1)
    for i in range(B):
        one = type(s)(
            prefix=1,
            size=s.size[i : i + 1],
            cls_attn=s.cls_attn[i : i + 1],
            values=s.values[i : i + 1],
        )
        alone = ATS(k=8)(x[i : i + 1], one)
        picked = sample_one(score[i], 8)
        assert sorted(j + 1 for j in picked) == alone.index[0, 1:].tolist()
        assert score[i].argmax().item() in picked
        assert score[i].argmin().item() not in picked  # CDF 0 is below the first level
        kept = out.index[i, 1:]
        if out.mask is not None:
            kept = kept[out.mask[i, 1:] > 0]
        assert sorted(kept.tolist()) == sorted(j + 1 for j in picked)


def test_peaked_scores_keep_fewer_tokens_than_flat_scores():
    flat = torch.full((1, 16), 1 / 16)
    peaked = torch.softmax(torch.arange(16.0)[None] * 2, dim=1)
    assert inverse_transform_sampling(peaked, 8).sum() < inverse_transform_sampling(flat, 8).sum()


def test_batch_is_padded_with_best_unsampled_tokens_marked_in_the_mask():
    x = tokens()
    s = make_signals(x)
    # Image 0: one dominant token -> few samples; images 1, 2: flat -> many.
    cls_attn = torch.full_like(s.cls_attn, 1 / N)
    cls_attn[0, :, 5] = 50.0
    values = torch.ones_like(s.values)
    out = ATS(k=8)(x, type(s)(prefix=1, size=s.size, cls_attn=cls_attn, values=values))
    assert out.mask is not None and out.mask.shape == out.index.shape
    counts = out.mask.sum(1)
    assert counts[0] < counts[1] == out.num_tokens
    fillers = out.mask[0] == 0
    assert fillers[-1] and not fillers[: int(counts[0])].any()  # fillers come last
    assert 5 in out.index[0, 1 : int(counts[0])].tolist()


def test_a_zero_value_token_is_never_sampled():
    x = tokens()
    s = make_signals(x)
    values = s.values.clone()
    target = s.cls_attn.sum(1)[:, 1:].argmax(1) + 1  # each image's most attended token
    values[torch.arange(B), :, target] = 0
    out = ATS(k=16)(x, type(s)(prefix=1, size=s.size, cls_attn=s.cls_attn, values=values))
    for i in range(B):
        keep = out.mask[i] > 0 if out.mask is not None else torch.ones(out.num_tokens, dtype=bool)
        assert target[i].item() not in out.index[i][keep].tolist()
