"""ATS's own invariants: significance scores, inverse transform sampling, adaptive count."""

from __future__ import annotations

import pytest
import torch

from reference.ats import ATS, inverse_transform_sampling, significance_scores
from reference.core import Signals
from tests.reference.conftest import B, N, make_signals, tokens
from tests.reference.fixtures import load, tensor

GOLDEN = load("ats")


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


@pytest.mark.parametrize(
    "case", GOLDEN["cases"], ids=lambda c: f"n{c['n']}-ref{c['n_ref']}-scale{c['logit_scale']:g}"
)
def test_reproduces_the_official_sampler_golden_fixture(case):
    """The official ``score_assignment_step`` + ``inverse_transform_sampling`` (levels: the
    initial count ``n_ref - 1``; attention with ``+ 1e-6 / N``) pick the same tokens."""
    x, cls_attn, values = tensor(case["x"]), tensor(case["cls_attn"]), tensor(case["values"])
    b, n, _ = x.shape
    signals = Signals(
        prefix=1, size=torch.ones(b, n, 1), cls_attn=cls_attn, values=values,
        state={"ats_init_n": case["n_ref"] - 1},  # an earlier ATS block saw n_ref tokens
    )  # fmt: skip
    out = ATS(k=n - 1)(x, signals)
    mask = out.mask if out.mask is not None else torch.ones(out.index.shape)
    for i in range(b):
        real = mask[i, 1:] > 0
        assert sorted((out.index[i, 1:][real] - 1).tolist()) == case["kept"][i]
        official = tensor(case["selected_x"])[i, 1:][tensor(case["policy"])[i, 1:] > 0]
        ours = out.x[i, 1:][real]
        # Same rows; the official code orders them by ascending score, ours by position.
        torch.testing.assert_close(
            ours[ours[:, 0].argsort()], official[official[:, 0].argsort()], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(out.x[i, 0], tensor(case["selected_x"])[i, 0])


def test_levels_stay_at_the_initial_count_in_later_blocks():
    """Official ``n_ref_tokens``: the first ATS block's count sets the levels of every block."""
    case = GOLDEN["cases"][1]
    assert case["n"] < case["n_ref"]
    x, cls_attn, values = tensor(case["x"]), tensor(case["cls_attn"]), tensor(case["values"])
    b, n, _ = x.shape

    def kept(state):
        s = Signals(prefix=1, size=torch.ones(b, n, 1), cls_attn=cls_attn, values=values,
                    state=state)  # fmt: skip
        out = ATS(k=n - 1)(x, s)
        mask = out.mask if out.mask is not None else torch.ones(out.index.shape)
        return [sorted((out.index[i, 1:][mask[i, 1:] > 0] - 1).tolist()) for i in range(b)]

    assert kept({"ats_init_n": case["n_ref"] - 1}) == case["kept"]
    assert kept({}) != case["kept"]  # levels = current count: not the official picks


def test_official_epsilon_matters_where_attention_underflows():
    case = GOLDEN["cases"][2]
    cls_attn, values = tensor(case["cls_attn"]), tensor(case["values"])
    assert (cls_attn == 0).any()
    plain = significance_scores(cls_attn, values, 1)
    official = significance_scores(cls_attn, values, 1, eps=1e-6)
    assert (plain == 0).any() and not (official[values[:, :, 1:].norm(dim=(1, 3)) > 0] == 0).any()
