"""Patch Slimming's own invariants: the head-path score, nested top-down masks."""

from __future__ import annotations

import itertools

import torch

from reference.core import Signals
from reference.hosts import vit
from reference.patch_slimming import PatchSlimming, path_gram, significance, slim, top_down_masks
from tests.reference.conftest import N, tiny_host, tokens


def maps(depth: int, b: int = 2, h: int = 2, n: int = 6, d: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    attn = [torch.randn(b, h, n, n, generator=gen).softmax(-1) for _ in range(depth)]
    values = [torch.randn(b, h, n, d, generator=gen) for _ in range(depth)]
    return attn, values


def test_path_gram_equals_enumerated_head_paths():
    attn, _ = maps(3)
    masks = [
        torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool),
        torch.tensor([1, 0, 0, 1, 0, 1], dtype=torch.bool),
        torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool),
    ]
    expected = torch.zeros(2, 6, 6)
    for heads in itertools.product(range(2), repeat=3):
        path = torch.eye(6).expand(2, 6, 6)
        for layer, h in enumerate(heads):  # A = D_3 P_3 D_2 P_2 D_1 P_1
            path = masks[layer].float()[:, None] * attn[layer][:, h] @ path
        expected += path.transpose(1, 2) @ path
    torch.testing.assert_close(path_gram(attn, masks), expected)


def test_last_layer_score_is_cls_attention_times_own_output():
    attn, values = maps(2)
    cls_only = torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool)
    score = significance(attn[0], values[0], attn[1:], [cls_only])
    own = (attn[0] @ values[0]).square().sum(dim=(1, 3))
    torch.testing.assert_close(score, attn[1][:, :, 0].square().sum(1) * own)


def test_top_down_masks_are_nested_and_pick_top_scores():
    attn, values = maps(4, n=8)
    keep = [6, 4, 4, 0]
    masks = top_down_masks(attn, values, keep, prefix=1)
    assert masks[:, 0].all() and masks[-1, 1:].sum() == 0  # last layer: CLS only
    assert (masks[:-1] >= masks[1:]).all()
    assert masks[:, 1:].sum(1).tolist() == keep
    # Layer 2 adds the top-4 patches scored through layer 3's CLS row.
    score = significance(attn[2], values[2], attn[3:], [masks[3]]).mean(0)
    assert set(masks[2, 1:].nonzero()[:, 0].add(1).tolist()) == set(
        score[1:].topk(4).indices.add(1).tolist()
    )


def test_reducer_keeps_the_given_positions_across_layers():
    x = tokens()
    sig = Signals(prefix=1, size=torch.ones(3, N, 1))
    first = PatchSlimming([0, 3, 5, 8, 9, 16])(x, sig)
    assert (first.index == torch.tensor([0, 3, 5, 8, 9, 16])).all()
    second = PatchSlimming([8, 16])(first.x, Signals(prefix=1, size=first.size, state=sig.state))
    torch.testing.assert_close(second.x, x[:, [0, 8, 16]])
    assert (second.assign == torch.tensor([0, -1, -1, 1, -1, 2])).all()


def test_slim_builds_a_pyramid_host():
    host = tiny_host(depth=4)
    reducers = slim(host, torch.randn(4, 3, 32, 32), keep=[12, 8, 5, 0])
    vit.apply(host, reducers)
    logits = host(torch.randn(2, 3, 32, 32))
    assert vit.tokens_after(host) == [13, 9, 6, 1] and torch.isfinite(logits).all()
