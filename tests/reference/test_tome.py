"""ToMe's own invariants, and parity with a per-sample loop over the official algorithm."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals
from reference.tome import ToMe, merge_wavg
from tests.reference.fixtures import load, tensor

GOLDEN = load("tome")


def official_merge(x, size, keys, r):
    """The official ``bipartite_soft_matching`` + ``merge_wavg`` for one sample, CLS only,
    written out step by step (no batching) as an independent check."""
    metric = keys / keys.norm(dim=-1, keepdim=True)
    a, b = metric[::2], metric[1::2]
    scores = a @ b.T
    scores[0, :] = -torch.inf  # CLS is never merged
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(descending=True)
    src, unm = order[:r], order[r:].sort().values
    xs, ss = x * size, size.clone()
    dst_x, dst_s = xs[1::2].clone(), ss[1::2].clone()
    for i in src.tolist():
        dst_x[node_idx[i]] += xs[::2][i]
        dst_s[node_idx[i]] += ss[::2][i]
    out_x = torch.cat([xs[::2][unm], dst_x])
    out_s = torch.cat([ss[::2][unm], dst_s])
    return out_x / out_s, out_s


def test_matches_the_official_algorithm_sample_by_sample():
    torch.manual_seed(0)
    x, keys = torch.randn(3, 17, 8), torch.randn(3, 17, 4)
    size = torch.randint(1, 4, (3, 17, 1)).float()
    out = merge_wavg(x, size, 5, 1, keys)
    for i in range(3):
        ref_x, ref_s = official_merge(x[i], size[i], keys[i], 5)
        torch.testing.assert_close(out.x[i], ref_x)
        torch.testing.assert_close(out.size[i], ref_s)


def test_size_weighted_sum_and_total_size_are_preserved():
    torch.manual_seed(1)
    x, keys, size = torch.randn(2, 33, 8), torch.randn(2, 33, 4), torch.rand(2, 33, 1) + 0.5
    out = merge_wavg(x, size, 9, 1, keys)
    torch.testing.assert_close((out.x * out.size).sum(1), (x * size).sum(1))
    torch.testing.assert_close(out.size.sum(1), size.sum(1))


def test_assign_points_every_token_at_the_output_that_holds_it():
    torch.manual_seed(2)
    x, keys, size = torch.randn(2, 17, 8), torch.randn(2, 17, 4), torch.ones(2, 17, 1)
    for prefix in (1, 2, 3):
        out = merge_wavg(x, size, 6, prefix, keys)
        # Each output is the size-weighted mean of the inputs assigned to it.
        onehot = torch.nn.functional.one_hot(out.assign, out.x.shape[1]).float()  # [B, N, N']
        mean = (onehot.transpose(1, 2) @ x) / onehot.sum(1)[..., None]
        torch.testing.assert_close(out.x, mean)
        assert (out.assign[:, :prefix] == torch.arange(prefix)).all()


def test_at_most_half_the_non_prefix_tokens_merge_in_one_step():
    x, keys = torch.randn(1, 11, 8), torch.randn(1, 11, 4)
    out = ToMe(r=100)(x, Signals(prefix=1, size=torch.ones(1, 11, 1), keys=keys))
    assert out.x.shape[1] == 11 - 5


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"n{c['n']}-prefix{c['prefix']}")
def test_reproduces_the_official_merge_golden_fixture(case):
    """Two merges in a row, as the official ``bipartite_soft_matching`` + ``merge_wavg``;
    without a prefix token the kept A tokens stay in score order, which changes step 2."""
    x, size, metric = tensor(case["x"]), tensor(case["size"]), tensor(case["metric"])
    for step in case["steps"]:
        out = merge_wavg(x, size, case["r"], case["prefix"], metric)
        torch.testing.assert_close(out.x, tensor(step["x"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.size, tensor(step["size"]), atol=1e-5, rtol=1e-5)
        x, size, metric = out.x, out.size, out.x


def test_always_sort_puts_the_kept_tokens_in_input_order_without_a_prefix():
    case = GOLDEN["cases"][0]
    assert case["prefix"] == 0
    x, size, metric = tensor(case["x"]), tensor(case["size"]), tensor(case["metric"])
    default = merge_wavg(x, size, case["r"], 0, metric)
    ordered = merge_wavg(x, size, case["r"], 0, metric, always_sort=True)
    n_unm = default.x.shape[1] - x.shape[1] // 2
    assert not torch.equal(default.index[:, :n_unm], ordered.index[:, :n_unm])
    assert (ordered.index[:, :n_unm].diff(dim=1) > 0).all()
    assert torch.equal(default.index.sort(1).values, ordered.index.sort(1).values)
