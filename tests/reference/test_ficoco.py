"""FiCoCo's own invariants: the redundancy filter, self-preserving compression, FiCoCo-L."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals
from reference.ficoco import FiCoCo, FiCoCoL, local_penalty, redundancy
from reference.hosts import vit
from reference.hosts.llava import TINY, LlavaHost, LLMSignals
from reference.tome import ToMe
from tests.reference.conftest import (
    B,
    N,
    assert_cached_decoding_matches,
    llava_inputs,
    make_signals,
    tiny_host,
    tokens,
)
from tests.reference.fixtures import load, tensor


def naive_redundancy(attn: torch.Tensor, beta: float = 0.35) -> torch.Tensor:
    """The Filter score written out per token, with the 2x2 local penalty: ``[B, 16]``."""
    a = attn.mean(1)
    out = torch.zeros(attn.shape[0], 16)
    for b in range(attn.shape[0]):
        cls = a[b, 0, 1:] / a[b, 0, 1:].norm()
        p2p = a[b, 1:, 1:].mean(-1)
        p2p = p2p / p2p.norm()
        out[b] = (1 - beta) * p2p - beta * cls
        for wy in range(2):
            for wx in range(2):
                cell = [(2 * wy + dy) * 4 + 2 * wx + dx for dy in range(2) for dx in range(2)]
                j = max(cell, key=lambda k, b=b: out[b, k])
                v = out[b, j]
                out[b, j] = v * 2 if v > 0 else v / 2
    return out


def test_discards_the_most_redundant_tokens():
    x = tokens()
    signals = make_signals(x, seed=1)
    out = FiCoCo(r=5)(x, signals)
    expected = naive_redundancy(signals.attn).argsort(1, descending=True)[:, 5:] + 1
    assert torch.equal(out.index[:, 1:], expected.sort(1).values)


def test_local_penalty_boosts_one_token_per_window():
    out = local_penalty(torch.tensor([[0.1, 0.4, -0.3, -0.2]]))  # one 2x2 window: 0.4 doubles
    assert torch.equal(out, torch.tensor([[0.1, 0.8, -0.3, -0.2]]))
    neg = local_penalty(torch.tensor([[-1.0, -0.5, -0.7, -0.9]]))  # max -0.5 halves
    assert torch.equal(neg, torch.tensor([[-1.0, -0.25, -0.7, -0.9]]))


def test_compression_is_a_size_weighted_mean_that_keeps_the_total():
    x = tokens()
    signals = make_signals(x, seed=2)
    out = FiCoCo(r=6)(x, signals)
    assert torch.equal(out.size.sum(1), signals.size.sum(1))  # sizes add up
    # With 16 patches the 0.998 quantile leaves one target per discarded token, so
    # a kept token is the mean of itself and the tokens assigned to it.
    for b in range(B):
        for slot in range(1, out.num_tokens):
            members = (out.assign[b] == slot).nonzero()[:, 0]
            assert out.index[b, slot] in members
            torch.testing.assert_close(out.x[b, slot], x[b, members].mean(0))
            assert out.size[b, slot, 0] == len(members)
    # The total content is conserved: size-weighted sums agree.
    torch.testing.assert_close((out.x * out.size).sum(1), x.sum(1), rtol=1e-5, atol=1e-5)


def test_budget_never_discards_every_patch():
    x = tokens()
    out = FiCoCo(r=100)(x, make_signals(x))
    assert out.num_tokens == 2 and FiCoCo(r=100).budget(N, 1) == (2, 2)


def test_llava_host_cached_decoding_equals_recomputing_the_pruned_sequence():
    images, prefix, suffix, valid = llava_inputs()
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=FiCoCo(r=10))
    vis, reduction = host.encode_images(images, {})
    assert vis.shape == (3, 6, TINY.hidden) and reduction.size.sum(1).eq(N).all()
    assert_cached_decoding_matches(host, images, prefix, suffix, valid)


def llm_case(seed: int = 0):
    """Hidden states and causal attention of ``[2 text][8 image][4 text]`` (last one padded)."""
    g = torch.Generator().manual_seed(seed)
    b, n, h = 2, 14, 4
    hid = torch.randn(b, n, 16, generator=g)
    logits = torch.randn(b, h, n, n, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, -1] = False
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = causal & valid[:, None, None, :]
    attn = logits.masked_fill(~mask, -torch.inf).softmax(-1)
    return hid, LLMSignals(image_start=2, image_len=8, valid=valid, attn=attn)


def test_ficoco_l_keeps_text_and_conserves_the_image_content():
    h, signals = llm_case()
    out = FiCoCoL(r=3)(h, signals)
    assert out.num_tokens == 14 - 3 and FiCoCoL(r=3).image_budget(8) == (5, 5)
    assert torch.equal(out.index[:, :2], torch.arange(2).expand(2, -1))
    assert torch.equal(out.index[:, -4:], torch.arange(10, 14).expand(2, -1))
    torch.testing.assert_close(out.x[:, -4:], h[:, -4:])
    # Discarded tokens are added with weights that sum to one per token (sum mode).
    torch.testing.assert_close(out.x[:, 2:7].sum(1), h[:, 2:10].sum(1), rtol=1e-5, atol=1e-5)
    # The discarded ones are the top-r of the redundancy score, written out.
    a = signals.attn.mean(1)
    for b in range(2):
        rows = [t for t in range(10, 14) if signals.valid[b, t]]
        relevance = a[b, rows, 2:10].mean(0)
        score = 0.6 * a[b, 2:10, 2:10].sum(-1) - 0.4 * relevance
        kept = score.argsort(descending=True)[3:].sort().values + 2
        assert torch.equal(out.index[b, 2:7], kept)


@torch.no_grad()
def test_ficoco_l_in_the_llava_host():
    images, prefix, suffix, valid = llava_inputs()
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(llm={1: FiCoCoL(r=6)})
    together, _ = host.prefill(images, prefix, suffix, valid)
    (index,) = host.last_trace
    assert index.shape[1] == 2 + 10 + 5 and (index.diff(dim=1) > 0).all()
    for i in range(3):  # padding changes nothing
        n = int(valid[i].sum())
        alone, _ = host.prefill(
            images[i : i + 1], prefix[i : i + 1], suffix[i : i + 1, :n], valid[i : i + 1, :n]
        )
        torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", load("ficoco")["cases"], ids=lambda c: f"r{c['r']}")
def test_filter_reproduces_the_official_ranking(case):
    """Official ``Filter`` on head-mean logits of 1 CLS + 24x24 patches (see the fixture)."""
    fx = load("ficoco")
    logits = (tensor(fx["q"]) @ tensor(fx["k"]).T)[None]  # [1, N, N]
    order = redundancy(logits, prefix=1).argsort(1, descending=True)[0] + 1
    assert order.tolist() == case["order"][:-1]  # the official order ends with CLS
    # The reducer takes the same plan from the host's per-head logits.
    x = torch.randn(1, 577, 8)
    heads = logits[:, None].expand(-1, 2, -1, -1)  # [1, H, N, N], every head equal
    signals = Signals(prefix=1, size=torch.ones(1, 577, 1), attn=heads.softmax(-1))
    signals.attn_logits = heads
    out = FiCoCo(r=case["r"])(x, signals)
    kept = sorted(set(range(1, 577)) - set(case["discarded"]))
    assert out.index[0, 1:].tolist() == kept


def head_mean_logits(attn_module, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """``[B, N, N]`` head mean of ``q k^T / sqrt(d) (+ log s)`` from a block's own q/k."""
    c, h = x.shape[-1], attn_module.num_heads
    q, k, _ = attn_module.qkv(x).chunk(3, -1)
    q, k = (t.unflatten(-1, (h, c // h)).transpose(1, 2) for t in (q, k))
    logits = q @ k.transpose(-1, -2) * (c // h) ** -0.5
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    return logits.mean(1)


def kept_by_hand(logits: torch.Tensor, r: int) -> list[list[int]]:
    order = redundancy(logits, prefix=1).argsort(1, descending=True)
    return (order[:, r:].sort(1).values + 1).tolist()


@torch.no_grad()
def test_vit_host_scores_with_the_blocks_logits_and_size_bias():
    """ToMe merges at block 0, so block 1's logits carry the proportional ``log s`` bias."""
    host = tiny_host(depth=2)
    seen = {}
    host.blocks[1].norm1.register_forward_hook(lambda m, i, o: seen.update(x=o))
    vit.apply(host, {0: ToMe(r=2), 1: FiCoCo(r=5)}, proportional_attn=True)
    host(torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    first, second = host.last_state.reductions
    logits = head_mean_logits(host.blocks[1].attn, seen["x"], first.size)
    assert second.index[:, 1:].tolist() == kept_by_hand(logits, 5)


@torch.no_grad()
def test_llava_host_scores_with_the_vision_layers_logits():
    images = llava_inputs()[0]
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=FiCoCo(r=10))
    seen = {}
    block = host.vision_tower.blocks[TINY.vision_layer]
    block.norm1.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    _, reduction = host.encode_images(images, {})
    logits = head_mean_logits(block.attn, seen["x"], None)
    assert reduction.index[:, 1:].tolist() == kept_by_hand(logits, 10)
