"""PPT's own invariants: ATS significance, per-image prune-or-pool by score variance."""

from __future__ import annotations

import math

import torch

from reference.core import keep_tokens
from reference.ppt import PPT, ppt_reduce, significance
from reference.tome import merge_wavg
from tests.reference.conftest import B, N, make_signals
from tests.reference.fixtures import load, tensor


def test_significance_is_cls_attention_times_value_norm_normalised(x):
    s = make_signals(x)
    score = significance(s.cls_attn, s.values, prefix=1)
    for i in range(B):
        raw = [
            float(s.cls_attn[i, :, j].sum()) * float(s.values[i, :, j].flatten().norm())
            for j in range(1, N)
        ]
        total = sum(raw)
        expected = torch.tensor([r / total for r in raw])
        torch.testing.assert_close(score[i], expected, rtol=1e-5, atol=1e-7)
    assert math.isclose(float(score.sum(1).mean()), 1.0, rel_tol=1e-6)


def run(x, r, threshold, prefix=1):
    s = make_signals(x, prefix)
    return ppt_reduce(x, s.size, s.cls_attn, s.values, s.keys, prefix, r, threshold), s


def test_threshold_zero_prunes_the_least_significant(x):
    (out, pooled), s = run(x, r=5, threshold=0.0)
    assert not pooled.any()
    top = significance(s.cls_attn, s.values, 1).topk(N - 1 - 5, dim=1).indices + 1
    # Official order: CLS, then the kept tokens by descending significance.
    assert torch.equal(out.index[:, 0], torch.zeros(B, dtype=torch.long))
    assert torch.equal(out.index[:, 1:], top)
    torch.testing.assert_close(out.x, x.gather(1, out.index[..., None].expand_as(out.x)))
    assert (out.size == 1).all() and ((out.assign >= 0).sum(1) == N - 5).all()
    # ``spatial_order`` keeps the same tokens in input order.
    s = make_signals(x)
    spatial, _ = ppt_reduce(x, s.size, s.cls_attn, s.values, s.keys, 1, 5, 0.0, True)
    expected = keep_tokens(x, s.size, 1, top)
    assert torch.equal(spatial.index, expected.index)
    torch.testing.assert_close(spatial.x, expected.x)
    assert torch.equal(spatial.assign, expected.assign)


def test_reproduces_the_official_block_golden_fixture():
    """The official ``pp_block_adaptive`` (timm Block, zero MLP) on fixed inputs: two
    images pool with ToMe, two prune and keep their tokens in descending-score order."""
    g = load("ppt")
    out, pooled = ppt_reduce(
        tensor(g["x_mid"]), tensor(g["size"]), tensor(g["cls_attn"]), tensor(g["values"]),
        tensor(g["keys"]), 1, g["r"], g["threshold"],
    )  # fmt: skip
    assert pooled.tolist() == g["pooled"]
    torch.testing.assert_close(out.x, tensor(g["out_x"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.size, tensor(g["out_size"]), atol=1e-5, rtol=1e-5)


def test_infinite_threshold_pools_with_tome(x):
    (out, pooled), s = run(x, r=5, threshold=math.inf)
    assert pooled.all()
    expected = merge_wavg(x, s.size, 5, 1, s.keys)
    torch.testing.assert_close(out.x, expected.x)
    assert torch.equal(out.assign, expected.assign)
    assert (out.size.sum(dim=(1, 2)) == N).all(), "pooling must keep every patch counted"


def test_each_image_gets_its_own_policy(x):
    s = make_signals(x)
    var = significance(s.cls_attn, s.values, 1).var(dim=1)
    ordered = var.sort().values
    threshold = float(ordered[:2].mean())  # the flattest image pools, the others prune
    (out, pooled), _ = run(x, r=4, threshold=threshold)
    assert torch.equal(pooled, var < threshold) and 0 < int(pooled.sum()) < B
    (pool_all, _), _ = run(x, r=4, threshold=math.inf)
    (prune_all, _), _ = run(x, r=4, threshold=0.0)
    for i in range(B):
        ref = pool_all if pooled[i] else prune_all
        torch.testing.assert_close(out.x[i], ref.x[i])
        assert torch.equal(out.assign[i], ref.assign[i])


def test_module_removes_r_and_caps_at_half(x):
    method = PPT(r=100)
    out = method(x, make_signals(x))
    assert out.num_tokens == N - (N - 1) // 2 == method.budget(N, 1)[0]
