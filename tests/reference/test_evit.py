"""EViT's own invariants: top-k by CLS attention, attention-weighted fusion of the rest."""

from __future__ import annotations

import math

import pytest
import torch

from reference.core import Signals, with_size
from reference.evit import EViT
from tests.reference.conftest import B, N, make_signals, tokens
from tests.reference.fixtures import load, tensor

GOLDEN = load("evit")


def test_keeps_exactly_the_top_k_by_head_mean_cls_attention():
    x = tokens()
    signals = make_signals(x)
    out = EViT(keep_rate=0.5)(x, signals)
    k = math.ceil(0.5 * (N - 1))
    score = signals.cls_attn[:, :, 1:].mean(1)  # [B, N - 1]
    expected = score.topk(k, dim=1).indices.sort(dim=1).values + 1
    assert out.num_tokens == 1 + k + 1
    assert torch.equal(out.index[:, 1 : 1 + k], expected)
    torch.testing.assert_close(
        out.x[:, 1 : 1 + k], x.gather(1, expected[..., None].expand(-1, -1, x.shape[-1]))
    )


def test_fused_token_is_the_attention_weighted_sum_of_the_dropped_tokens():
    x = tokens(seed=1)
    signals = make_signals(x, seed=1)
    out = EViT(keep_rate=0.25)(x, signals)
    score = signals.cls_attn.mean(1)  # [B, N]
    for i in range(B):
        kept = set(out.index[i, 1:-1].tolist())
        dropped = [j for j in range(1, N) if j not in kept]
        expected = sum(score[i, j] * x[i, j] for j in dropped)
        torch.testing.assert_close(out.x[i, -1], expected)
        assert out.size[i, -1, 0] == len(dropped)
        assert (out.assign[i, dropped] == out.num_tokens - 1).all()
    assert (out.index[:, -1] == -1).all()


def test_without_fusion_no_token_is_added_and_dropped_tokens_are_unassigned():
    x = tokens()
    out = EViT(keep_rate=0.5, fuse=False)(x, make_signals(x))
    assert out.num_tokens == 1 + math.ceil(0.5 * (N - 1))
    assert (out.assign == -1).sum(1).eq(N - out.num_tokens).all()
    assert EViT(keep_rate=0.5, fuse=False).budget(N, 1) == (out.num_tokens,) * 2


def test_fused_token_can_be_kept_or_fused_again_in_a_later_block():
    x = tokens()
    first = EViT(keep_rate=0.5)(x, make_signals(x))
    signals = with_size(make_signals(first.x, seed=3), first.size)
    second = EViT(keep_rate=0.5)(first.x, signals)
    assert second.num_tokens == 1 + math.ceil(0.5 * (first.num_tokens - 1)) + 1
    assert second.size.sum(1).eq(N).all()  # every patch is still accounted for once


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"keep{c['keep_rate']}")
def test_reproduces_the_official_block_golden_fixture(case):
    """The official ``Block`` (fuse_token) keeps the same tokens and fuses the same value."""
    x, cls_attn, official = tensor(case["x"]), tensor(case["cls_attn"]), tensor(case["out"])
    b, n, _ = x.shape
    signals = Signals(prefix=1, size=torch.ones(b, n, 1), cls_attn=cls_attn)
    out = EViT(keep_rate=case["keep_rate"])(x, signals)
    idx = torch.tensor(case["idx"])  # official kept image tokens, descending score
    k = idx.shape[1]
    assert out.num_tokens == official.shape[1] == 1 + k + 1
    assert torch.equal(out.index[:, 1 : k + 1] - 1, idx.sort(dim=1).values)
    # Ours keeps spatial order, the official code score order: compare in spatial order.
    spatial = official[:, 1 : k + 1].gather(
        1, idx.argsort(dim=1)[..., None].expand(-1, -1, x.shape[2])
    )
    torch.testing.assert_close(out.x[:, 1 : k + 1], spatial, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.x[:, 0], official[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.x[:, -1], official[:, -1], atol=1e-5, rtol=1e-5)  # fused
