"""FasterVLM's own invariants: top-T patches by [CLS] attention, in the LLaVA host too."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals
from reference.fastervlm import FasterVLM
from reference.hosts.llava import TINY, LlavaHost
from reference.hosts.vit import HostState
from tests.reference.conftest import (
    N,
    assert_cached_decoding_matches,
    llava_inputs,
    make_signals,
    tokens,
)
from tests.reference.fixtures import load, tensor

GOLDEN = load("fastervlm")


def test_keeps_exactly_the_top_t_by_head_mean_cls_attention_in_order():
    x = tokens()
    signals = make_signals(x)
    out = FasterVLM(tokens=6)(x, signals)
    score = signals.cls_attn[:, :, 1:].mean(1)  # [B, N - 1]
    expected = score.topk(6, dim=1).indices.sort(dim=1).values + 1
    assert out.num_tokens == 1 + 6
    assert torch.equal(out.index[:, 1:], expected)
    torch.testing.assert_close(
        out.x[:, 1:], x.gather(1, expected[..., None].expand(-1, -1, x.shape[-1]))
    )
    dropped = (out.assign == -1).sum(1)
    assert dropped.eq(N - 7).all()  # pruned tokens go nowhere


def test_prefix_tokens_are_not_ranked():
    x = tokens(seed=2)
    signals = make_signals(x, prefix=2, seed=2)
    out = FasterVLM(tokens=4)(x, signals)
    expected = signals.cls_attn[:, :, 2:].mean(1).topk(4, dim=1).indices.sort(1).values + 2
    assert torch.equal(out.index[:, 2:], expected)


def test_ratio_gives_the_readme_token_counts():
    assert [FasterVLM.from_ratio(r).tokens for r in (0.75, 0.9, 0.95)] == [144, 58, 29]
    assert FasterVLM.from_ratio(0.9).budget(577, 1) == (59, 59)
    assert FasterVLM(tokens=100).budget(N, 1) == (N, N)  # capped at the patch count


@torch.no_grad()
def test_llava_host_prunes_by_the_selected_layers_full_attention():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=FasterVLM(tokens=5))
    images = llava_inputs()[0]
    got, reduction = host.encode_images(images, {})
    # Independently: the selected layer's full attention maps, official selection.
    vt = host.vision_tower
    x = vt.patch_embed(images)
    x = torch.cat([vt.cls_token.expand(x.shape[0], -1, -1), x], 1) + vt.pos_embed
    ctx = HostState(x, 1, proportional=False)
    for block in vt.blocks[: TINY.vision_layer]:
        x = block(x, ctx)
    block = vt.blocks[TINY.vision_layer]
    out, signals = block.attn(block.norm1(x), None, frozenset({"attn"}))
    x = x + out
    x = x + block.mlp(block.norm2(x))
    score = signals["attn"][:, :, 0, 1:].mean(1)  # [B, 16]
    mask = torch.zeros_like(score, dtype=torch.bool).scatter(1, score.topk(5, 1).indices, True)
    expected = host.mm_projector(x[:, 1:][mask].view(3, 5, -1))
    assert got.shape == (3, 5, TINY.hidden)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(reduction.index[:, 1:] - 1, mask.nonzero()[:, 1].view(3, 5))


def test_llava_host_cached_decoding_equals_recomputing_the_pruned_sequence():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=FasterVLM(tokens=5))
    assert assert_cached_decoding_matches(host, *llava_inputs()) == 2 + 5 + 5


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"b{len(c['x'])}t{c['tokens']}")
def test_reproduces_the_official_encode_images_golden_fixture(case):
    """The official ``encode_images`` keeps the same patches (its ``index_masks``)."""
    x, cls_attn = tensor(case["x"]), tensor(case["cls_attn"])
    b, n, _ = x.shape
    signals = Signals(prefix=1, size=torch.ones(b, n, 1), cls_attn=cls_attn)
    out = FasterVLM(tokens=case["tokens"])(x, signals)
    assert out.num_tokens == 1 + case["tokens"]
    assert torch.equal(out.index[:, 1:] - 1, torch.tensor(case["kept"]))
    torch.testing.assert_close(out.x[:, 1:], tensor(case["kept_x"]), atol=1e-5, rtol=1e-5)
