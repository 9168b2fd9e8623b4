"""PYRA's own invariants: it starts as ToMe, and re-activates only the merged sources."""

from __future__ import annotations

import pytest
import torch

from reference.pyra import PYRA, pyra_merge
from reference.tome import bipartite_soft_matching, merge_wavg
from tests.reference.conftest import C, make_signals, tokens
from tests.reference.fixtures import load, tensor

GOLDEN = load("pyra")


def test_initialisation_is_exactly_tome():
    x = tokens()
    signals = make_signals(x)
    out = PYRA(dim=C, r=4).eval()(x, signals)
    ref = merge_wavg(x, signals.size, 4, 1, signals.keys)
    torch.testing.assert_close(out.x, ref.x)
    assert torch.equal(out.index, ref.index) and torch.equal(out.assign, ref.assign)


def test_sources_are_reactivated_before_the_size_weighted_merge():
    torch.manual_seed(0)
    x = tokens(seed=1)
    signals = make_signals(x, seed=1)
    signals.size = torch.randint(1, 4, signals.size.shape).float()
    method = PYRA(dim=C, r=3).eval()
    with torch.no_grad():
        method.b.normal_()
        method.norm.weight.normal_()
    out = method(x, signals)
    ref = merge_wavg(x, signals.size, 3, 1, signals.keys)
    torch.testing.assert_close(out.size, ref.size)  # sizes are ToMe's
    _, src_idx, dst_idx, _ = bipartite_soft_matching(signals.keys, 3, 1)
    expected = ref.x * ref.size
    for i in range(x.shape[0]):
        w = x[i] * signals.size[i]
        src, dst = w[::2][src_idx[i]], w[1::2][dst_idx[i]]  # [r, C] in matching order
        p = method.norm(src + dst)
        w_channel = 2 * torch.sigmoid((method.a[:, 0, None] * p).sum(0))  # [C]
        w_token = 2 * torch.sigmoid(p @ method.b[0]) - 1  # [r]
        for j in range(3):
            slot = ref.assign[i, 2 * src_idx[i, j]]
            expected[i, slot] += src[j] * w_channel * w_token[j]
    torch.testing.assert_close(out.x, expected / ref.size)
    merged = torch.zeros_like(out.x[..., 0], dtype=torch.bool)
    merged.scatter_(1, ref.assign.gather(1, 2 * src_idx), True)
    assert not torch.allclose(out.x[merged], ref.x[merged])
    torch.testing.assert_close(out.x[~merged], ref.x[~merged])  # others untouched


def test_weights_stay_in_their_ranges():
    from reference.pyra import reactivation

    torch.manual_seed(0)
    pairs = torch.randn(2, 5, C) * 10
    w_channel, w_token = reactivation(
        pairs, torch.randn(5, 1) * 10, torch.randn(1, C) * 10, torch.nn.LayerNorm(C)
    )
    assert w_channel.shape == (2, 1, C) and w_token.shape == (2, 5, 1)
    assert (w_channel >= 0).all() and (w_channel <= 2).all()
    assert (w_token >= -1).all() and (w_token <= 1).all()


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"n{c['n']}-prefix{c['prefix']}")
def test_reproduces_the_official_pyra_merge_golden_fixture(case):
    """The official ``merge_wavg(..., pyra_weight=(a, b, norm))`` with random learned weights:
    same output slot for every input token, same merged tokens and sizes."""
    x, size, metric = tensor(case["x"]), tensor(case["size"]), tensor(case["metric"])
    norm = torch.nn.LayerNorm(x.shape[-1])
    with torch.no_grad():
        norm.weight.copy_(tensor(case["norm_weight"]))
        norm.bias.copy_(tensor(case["norm_bias"]))
        out = pyra_merge(
            x, size, case["r"], case["prefix"], metric, tensor(case["a"]), tensor(case["b"]), norm
        )
    assert torch.equal(out.assign, torch.tensor(case["assign"]))
    torch.testing.assert_close(out.x, tensor(case["out_x"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.size, tensor(case["out_size"]), atol=1e-5, rtol=1e-5)
