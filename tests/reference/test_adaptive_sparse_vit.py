"""AS-ViT's own invariants: its score, the learnable threshold, per-image counts."""

from __future__ import annotations

from dataclasses import replace

import torch

from reference.adaptive_sparse_vit import AdaptiveSparseViT, head_weighted_cls_attention
from reference.hosts import vit
from tests.reference.conftest import B, H, N, make_signals, tiny_host


def test_score_is_head_importance_weighted_class_attention(x):
    s = make_signals(x)
    expected = torch.zeros(B, N)
    for b in range(B):
        for j in range(N):
            norms = torch.stack([(s.attn[b, h, j] @ s.values[b, h]).norm() for h in range(H)])
            weights = norms / norms.sum()
            expected[b, j] = sum(s.attn[b, h, 0, j] * weights[h] for h in range(H))
    torch.testing.assert_close(head_weighted_cls_attention(s.attn, s.values), expected)


def test_inference_keeps_exactly_the_tokens_over_the_threshold(x):
    s = make_signals(x)
    out = AdaptiveSparseViT(threshold=0.06).eval()(x, s)
    score = head_weighted_cls_attention(s.attn, s.values)
    counts = set()
    for i in range(B):
        kept = out.index[i][out.index[i] >= 0]
        assert kept.tolist() == [0] + [j for j in range(1, N) if score[i, j] > 0.06]
        counts.add(len(kept))
    assert len(counts) > 1, "the test input should give different counts per image"
    empty = out.index == -1
    assert (out.size[..., 0][empty] == 0).all() and torch.equal(out.mask.bool(), ~empty)


def test_training_mask_is_hard_with_a_gradient_for_the_threshold(x):
    method = AdaptiveSparseViT(threshold=0.06, tau=0.01).train()
    s = make_signals(x)
    out = method(x, s)
    score = head_weighted_cls_attention(s.attn, s.values)[:, 1:]
    assert out.num_tokens == N
    assert torch.equal(out.mask[:, 1:], (score > 0.06).float()) and (out.mask[:, 0] == 1).all()
    out.mask.sum().backward()
    # d/dtheta sigmoid((s - theta) / tau) = -y (1 - y) / tau
    y = torch.sigmoid((score - 0.06) / 0.01)
    torch.testing.assert_close(method.threshold.grad, -(y * (1 - y)).sum() / 0.01)


def test_training_masks_keep_earlier_drops(x):
    s = make_signals(x)
    first = AdaptiveSparseViT(threshold=0.06).train()(x, s)
    second = AdaptiveSparseViT(threshold=0.0).train()(x, s)  # would keep everything alone
    assert torch.equal(second.mask, first.mask)
    assert len(s.state["adaptive_sparse_vit"]["masks"]) == 2


def test_empty_slots_never_come_back(x):
    out = AdaptiveSparseViT(threshold=0.06).eval()(x, make_signals(x))
    again = AdaptiveSparseViT(threshold=-1.0).eval()(
        out.x, replace(make_signals(out.x), size=out.size)
    )
    assert torch.equal(again.index == -1, out.index == -1)


def test_cap_keeps_the_highest_scores(x):
    s = make_signals(x)
    out = AdaptiveSparseViT(threshold=-1.0, max_keep=0.25).eval()(x, s)
    score = head_weighted_cls_attention(s.attn, s.values)[:, 1:]
    expected = score.topk(4, dim=1).indices.sort(dim=1).values + 1
    assert torch.equal(out.index[:, 1:], expected)


def test_an_image_gets_the_same_logits_in_any_batch():
    host = tiny_host()
    method = AdaptiveSparseViT(threshold=0.06).eval()
    vit.apply(host, {layer: method for layer in (1, 2, 3)}, proportional_attn=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    together = host(images)
    counts = set()
    for i in range(3):
        torch.testing.assert_close(host(images[i : i + 1])[0], together[i], rtol=1e-4, atol=1e-5)
        counts.add(tuple(vit.tokens_after(host)))
    assert len(counts) > 1, "the images should keep different counts"
