"""HiRED's own invariants: top-k by CLS attention, tile budgets from early attention, host."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals
from reference.hired import HiRED, hired_keep, tile_ids
from reference.hosts.llava import TINY, LlavaHost
from tests.reference.conftest import (
    B,
    assert_cached_decoding_matches,
    llava_inputs,
    make_signals,
    tokens,
)
from tests.reference.fixtures import load, tensor

GOLDEN = load("hired")


def test_single_partition_keeps_the_top_k_by_head_summed_cls_attention():
    x = tokens()
    s = make_signals(x)
    out = HiRED(budget=0.25)(x, s)
    score = s.cls_attn.sum(1)[:, 1:]
    want = (score.topk(4, dim=1).indices + 1).sort(1).values
    assert torch.equal(out.index[:, 1:], want)
    torch.testing.assert_close(out.x[:, 1:], x.gather(1, want[..., None].expand(-1, -1, 32)))


def test_tiles_are_spatial_quadrants():
    t = tile_ids(16, 2, torch.device("cpu")).view(4, 4)
    assert t.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_budget_goes_to_the_tiles_that_hold_the_early_attention():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(2, 16, generator=g)
    early = torch.rand(2, 16, generator=g) * 0.01
    tiles = tile_ids(16, 2, torch.device("cpu"))
    early[0, tiles == 3] += 1  # all early attention in the bottom-right tile
    early[1, tiles == 0] += 1  # ... and in the top-left one
    # alpha=0.75: the top 4 early tokens form the distribution, all in one tile.
    keep = hired_keep(score, early, k=4, grid=2, alpha=0.75)
    assert keep.sum(1).tolist() == [4, 4]
    assert (tiles[keep[0]] == 3).all() and (tiles[keep[1]] == 0).all()


def test_quotas_follow_the_share_and_each_tile_keeps_its_best():
    score = torch.arange(16.0)[None].flip(1)  # token 0 is the best overall
    tiles = tile_ids(16, 2, torch.device("cpu"))
    early = torch.zeros(1, 16)
    early[0, tiles == 1] = 2.0  # the top 8 early tokens: tile 1 (4) and tile 3 (4)
    early[0, tiles == 3] = 1.0
    keep = hired_keep(score, early, k=4, grid=2, alpha=0.5)[0]
    # two per tile, each tile's two best by final attention (smallest indices here)
    assert keep.nonzero().flatten().tolist() == [2, 3, 10, 11]


def test_unspent_budget_is_filled_with_the_best_remaining_tokens():
    score = torch.arange(16.0)[None].flip(1)
    tiles = tile_ids(16, 2, torch.device("cpu"))
    early = torch.zeros(1, 16)
    early[0, tiles == 1] = 2.0
    early[0, torch.tensor([10])] = 1.0  # shares 4/5 and 1/5 of k=3: quotas 2 and 0
    keep = hired_keep(score, early, k=3, grid=2, alpha=1 - 5 / 16)[0]
    assert keep.nonzero().flatten().tolist() == [0, 2, 3]  # tile 1's best two, then token 0


def test_early_attention_comes_from_state():
    x = tokens()
    s = make_signals(x)
    method = HiRED(budget=0.25, grid=2, alpha=0.75)
    early = torch.full_like(s.cls_attn, 0.01)
    early[:, :, 1 + torch.tensor([0, 1, 4, 5])] = 1.0  # the top-left quadrant
    s.state["early_cls_attn"] = early
    out = method(x, s)
    assert (out.index[:, 1:] - 1 == torch.tensor([0, 1, 4, 5])).all()
    assert out.x.shape == (B, 5, 32)


def test_llava_host_cached_decoding_equals_recomputation():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=HiRED(budget=0.5, grid=2))
    images, prefix, suffix, valid = llava_inputs()
    vis, _ = host.encode_images(images, {})
    assert vis.shape[1] == 8
    assert_cached_decoding_matches(host, images, prefix, suffix, valid)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"b{len(c['x'])}k{c['budget']}")
def test_reproduces_the_official_llava_1_5_selection_golden_fixture(case):
    """The official ``HiRED_token_selection`` keeps the same patches (each sample run alone)."""
    x, cls_attn = tensor(case["x"]), tensor(case["cls_attn"])
    b, n, _ = x.shape
    signals = Signals(prefix=1, size=torch.ones(b, n, 1), cls_attn=cls_attn)
    out = HiRED(budget=case["budget"])(x, signals)
    kept = torch.tensor(case["kept"])
    assert out.num_tokens == 1 + kept.shape[1]
    assert torch.equal(out.index[:, 1:] - 1, kept)
    torch.testing.assert_close(out.x[:, 1:], tensor(case["kept_x"]), atol=1e-5, rtol=1e-5)
