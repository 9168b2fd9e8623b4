"""PruMerge's own invariants: IQR keep set, k-NN merge, extra token, PruMerge+ grid, host."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference.core import Signals
from reference.hosts.llava import TINY, LlavaHost
from reference.hosts.vit import HostState
from reference.llava_prumerge import LLaVAPruMerge, official_signals, prumerge
from tests.reference.conftest import (
    B,
    assert_cached_decoding_matches,
    llava_inputs,
    make_signals,
    tokens,
)
from tests.reference.fixtures import load, tensor


def outliers_numpy(a: np.ndarray) -> set[int]:
    """The official ``outlier_dectection`` on one image's scores."""
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    return {int(i) for i in np.where(a > q3 + 1.5 * (q3 - q1))[0]}


def peaked_signals(x, counts, seed=0):
    """Signals whose CLS attention has ``counts[b]`` clear outliers in image b."""
    s = make_signals(x, seed=seed)
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(x.shape[0], 4, x.shape[1], generator=g) * 0.01 + 0.01
    for b, c in enumerate(counts):
        attn[b, :, 1 + torch.randperm(x.shape[1] - 1, generator=g)[:c]] += 0.5
    s.cls_attn = attn / attn.sum(-1, keepdim=True)
    return s


def test_adaptive_keep_set_is_the_iqr_outliers_in_spatial_order():
    x = tokens()
    s = peaked_signals(x, [3, 3, 3])
    out = LLaVAPruMerge()(x, s)
    a = s.cls_attn.mean(1)[:, 1:]
    for b in range(B):
        want = sorted(j + 1 for j in outliers_numpy(a[b].numpy()))
        assert len(want) == 3
        assert out.index[b, 1:-1].tolist() == want
        assert out.index[b, -1] == -1  # the extra token is new
    assert out.mask is None and out.x.shape[1] == 1 + 3 + 1


def test_merge_and_extra_token_follow_the_official_loop():
    x = tokens()
    s = make_signals(x)
    k_nn = 5
    out = LLaVAPruMerge(keep_ratio=0.25, k_nn=k_nn)(x, s)
    a = s.cls_attn.mean(1)[:, 1:]
    keys = F.normalize(s.keys[:, 1:], dim=-1)
    feats = x[:, 1:]
    for b in range(B):
        kept = a[b].topk(4).indices.tolist()
        for slot, i in enumerate(sorted(kept)):
            others = [j for j in range(16) if j != i]
            sim = keys[b, others] @ keys[b, i]
            nn = [others[t] for t in sim.topk(k_nn).indices.tolist()]
            want = feats[b, i] + (a[b, nn, None] * feats[b, nn]).sum(0)
            torch.testing.assert_close(out.x[b, 1 + slot], want)
        pruned = [j for j in range(16) if j not in kept]
        extra = (a[b, pruned, None] * feats[b, pruned]).sum(0)
        torch.testing.assert_close(out.x[b, -1], extra)
        assert (out.assign[b, [p + 1 for p in pruned]] == 5).all()
        assert out.size[b, -1, 0] == len(pruned)


def test_unequal_counts_are_padded_with_the_best_pruned_tokens():
    x = tokens()
    s = peaked_signals(x, [1, 3, 2])
    out = LLaVAPruMerge()(x, s)
    assert out.x.shape[1] == 1 + 3 + 1
    assert out.mask is not None
    assert out.mask.sum(1).tolist() == [1 + 1 + 1, 1 + 3 + 1, 1 + 2 + 1]
    a = s.cls_attn.mean(1)[:, 1:]
    # image 0 keeps one token, then its extra token, then fillers made from its 2nd
    # and 3rd best tokens, which went into the extra token: index -1, size 0
    best = a[0].topk(3).indices + 1
    assert out.index[0, 1] == best[0] and out.index[0, 2] == -1
    assert out.index[0, 3:].tolist() == [-1, -1] and (out.size[0, 3:] == 0).all()
    assert out.assign[0, best[1:]].tolist() == [2, 2]
    # the extra token's size counts every pruned token, fillers' sources included
    assert out.size[0, 2, 0] == 16 - 1 and out.size.sum(1).squeeze(1).tolist() == [17.0] * 3


def test_plus_adds_a_uniform_grid_to_the_outliers():
    x = tokens()
    s = peaked_signals(x, [2, 2, 2])
    base = LLaVAPruMerge()(x, s)
    plus = LLaVAPruMerge(plus=True)(x, s)
    # 2 of 16 kept: step 16 // 2 = 8, stride 8 // 3 = 2 -> positions 0, 2, ..., 14
    grid = set(range(0, 15, 2))
    for b in range(B):
        base_set = set(base.index[b, 1:-1].tolist())
        idx = plus.index[b] if plus.mask is None else plus.index[b][plus.mask[b].bool()]
        kept = {j for j in idx[1:].tolist() if j >= 0}
        assert kept == base_set | {g + 1 for g in grid}


def test_keep_ratio_is_exact_and_one_is_identity():
    x = tokens()
    out = LLaVAPruMerge(keep_ratio=0.5)(x, make_signals(x))
    assert out.x.shape[1] == 1 + 8 + 1 == LLaVAPruMerge(keep_ratio=0.5).budget(17, 1)[0]
    same = LLaVAPruMerge(keep_ratio=1.0)(x, make_signals(x))
    assert torch.equal(same.x, x)


def test_functional_core_matches_module():
    x = tokens()
    s = make_signals(x)
    got = prumerge(x, s.size, s.cls_attn, s.keys, 1)
    torch.testing.assert_close(got.x, LLaVAPruMerge()(x, Signals(**vars(s))).x)


def test_llava_host_cached_decoding_equals_recomputation():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=LLaVAPruMerge(keep_ratio=0.25))
    images, prefix, suffix, valid = llava_inputs()
    vis, red = host.encode_images(images, {})
    assert vis.shape[1] == 4 + 1 and red is not None
    assert_cached_decoding_matches(host, images, prefix, suffix, valid)


@pytest.mark.parametrize("case", load("llava_prumerge")["cases"], ids=lambda c: f"plus{c['plus']}")
def test_reproduces_the_official_prune_and_merge(case):
    """Official ``token_prune_merge_advanced(_plus)``, adaptive, on given q/k (see the fixture)."""
    fx = load("llava_prumerge")
    k = tensor(fx["k"])[None]  # [1, 577, 4]
    q = torch.zeros_like(k)
    q[:, 0] = tensor(fx["q_cls"])
    x = torch.cat([torch.zeros(1, 1, 4), tensor(fx["x"])[None]], 1)  # a CLS slot, then patches
    signals = Signals(prefix=1, size=torch.ones(1, 577, 1), cls_attn=None, keys=None)
    signals.next_q, signals.next_k = q, k
    out = LLaVAPruMerge(plus=case["plus"])(x, signals)
    selected = case["selected"]
    assert out.num_tokens == 1 + len(selected) + 1
    assert sorted(out.index[0, 1:-1].tolist()) == sorted(i + 1 for i in selected)
    official = dict(zip(selected, tensor(case["out"])[:-1], strict=True))
    ours = torch.stack([official[int(i) - 1] for i in out.index[0, 1:-1]])
    torch.testing.assert_close(out.x[0, 1:-1], ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.x[0, -1], tensor(case["out"])[-1], atol=1e-5, rtol=1e-5)


def tower_output(host: LlavaHost, images: torch.Tensor) -> torch.Tensor:
    """The vision features at the hook: the output of block ``vision_layer``."""
    vt = host.vision_tower
    x = vt.patch_embed(images)
    x = torch.cat([vt.cls_token.expand(x.shape[0], -1, -1), x], 1) + vt.pos_embed
    for block in vt.blocks[: host.cfg.vision_layer + 1]:
        x = block(x, HostState(x, 1, proportional=False))
    return x


@torch.no_grad()
@pytest.mark.parametrize("ratio", [None, 0.25])
@pytest.mark.parametrize("plus", [False, True])
def test_llava_host_scores_with_the_next_blocks_projections(plus, ratio):
    """Default ``signals="next"``: q/k of the block after the hook, computed by hand."""
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=LLaVAPruMerge(keep_ratio=ratio, plus=plus))
    images = llava_inputs()[0]
    _, got = host.encode_images(images, {})
    x = tower_output(host, images)
    nxt, c = host.vision_tower.blocks[TINY.vision_layer + 1], x.shape[-1]
    y = F.layer_norm(x, (c,), nxt.norm1.weight, nxt.norm1.bias, eps=1e-6)
    w, b = nxt.attn.qkv.weight, nxt.attn.qkv.bias
    cls_attn, keys = official_signals(y @ w[:c].T + b[:c], y @ w[c : 2 * c].T + b[c : 2 * c])
    want = prumerge(x, torch.ones(B, x.shape[1], 1), cls_attn, keys, 1, ratio, plus)
    assert torch.equal(got.index, want.index)
    torch.testing.assert_close(got.x, want.x)
    # The hook layer's own signals (the fallback) keep a different set on these images.
    host.apply(vision=LLaVAPruMerge(keep_ratio=ratio, plus=plus, signals="hook"))
    _, hook = host.encode_images(images, {})
    assert not torch.equal(hook.index, got.index)


@torch.no_grad()
def test_a_hook_at_the_last_block_falls_back_to_the_hook_signals():
    torch.manual_seed(0)
    host = LlavaHost(replace(TINY, vision_layer=TINY.vision["depth"] - 1)).eval()
    images = llava_inputs()[0]
    _, default = host.apply(vision=LLaVAPruMerge(keep_ratio=0.25)).encode_images(images, {})
    _, hook = host.apply(vision=LLaVAPruMerge(keep_ratio=0.25, signals="hook")).encode_images(
        images, {}
    )
    assert torch.equal(default.index, hook.index)
    torch.testing.assert_close(default.x, hook.x)
    assert LLaVAPruMerge(signals="hook").needs == {"cls_attn", "keys"}
