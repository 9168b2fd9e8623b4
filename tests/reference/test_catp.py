"""CATP's own invariants: Borda-count votes of image tokens over the query tokens."""

from __future__ import annotations

import pytest
import torch

from reference.catp import CATP, cross_attention_votes
from reference.core import Signals
from reference.hosts.llava import TINY, LlavaHost
from tests.reference.conftest import (
    B,
    N,
    assert_cached_decoding_matches,
    llava_inputs,
    make_signals,
    tokens,
)
from tests.reference.fixtures import load, tensor

NQ = N - 1


def cross_attn(layers: int = 2, heads: int = 3, m: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, layers, heads, NQ, m, generator=g).softmax(-1)  # [B, L, H, Nq, M]


def naive_votes(attn: torch.Tensor) -> torch.Tensor:
    """Loop version: each (head, image token) gives rank r to the query it ranks r-th lowest."""
    b, h, nq, m = attn.shape
    scores = torch.zeros(b, nq)
    for i in range(b):
        for head in range(h):
            for j in range(m):
                order = sorted(range(nq), key=lambda q: attn[i, head, q, j].item())
                for rank, q in enumerate(order):
                    scores[i, q] += rank
    return scores


def with_state(x: torch.Tensor, **state) -> Signals:
    signals = make_signals(x)
    signals.state = state
    return signals


def test_scores_are_the_borda_count_of_the_last_layer():
    ca = cross_attn()
    torch.testing.assert_close(cross_attention_votes(ca), naive_votes(ca[:, -1]))
    torch.testing.assert_close(cross_attention_votes(ca, all_layers=True), naive_votes(ca.sum(1)))


def test_keeps_exactly_the_top_half_by_votes_in_order():
    x, ca = tokens(), cross_attn()
    out = CATP(downsample=2)(x, with_state(x, cross_attn=ca))
    expected = naive_votes(ca[:, -1]).topk(NQ // 2, dim=1).indices.sort(1).values + 1
    assert out.num_tokens == 1 + NQ // 2
    assert torch.equal(out.index[:, 1:], expected)
    torch.testing.assert_close(out.x[:, 1:], x.gather(1, expected[..., None].expand(-1, -1, 32)))
    assert ((out.assign >= 0).sum(1) == out.num_tokens).all()


def test_the_query_every_image_token_prefers_survives_and_the_least_preferred_goes():
    x, ca = tokens(), cross_attn(layers=1).clone()
    ca[:, :, :, 5] = 1.0  # token 6 attends most to every image token
    ca[:, :, :, 9] = 0.0  # token 10 attends least
    out = CATP(downsample=8)(x, with_state(x, cross_attn=ca))
    assert (out.index == 6).any(1).all() and not (out.index == 10).any()


def test_image_weights_scale_each_column_before_ranking():
    x, ca = tokens(), cross_attn(m=10)
    image_attn = torch.rand(B, 2, 10, 10, generator=torch.Generator().manual_seed(3))
    image_attn[..., 3] = 0.0  # image token 3 gets no attention: weight 0
    weight = torch.nn.functional.normalize(image_attn.sum((1, 2)), dim=-1)
    out = CATP(downsample=4, image_weight=True)(
        x, with_state(x, cross_attn=ca, image_attn=image_attn)
    )
    # A zero-weight column ranks by position (ties); the others rank as unweighted.
    votes = naive_votes(ca[:, -1] * weight[:, None, None, :])
    expected = votes.topk(NQ // 4, dim=1).indices.sort(1).values + 1
    assert torch.equal(out.index[:, 1:], expected)
    image_attn[..., 3] = 1.0  # all weights positive: the same tokens as without weights
    weighted = CATP(downsample=4, image_weight=True)(
        x, with_state(x, cross_attn=ca, image_attn=image_attn)
    )
    unweighted = CATP(downsample=4)(x, with_state(x, cross_attn=ca))
    assert torch.equal(weighted.index, unweighted.index)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("case", load("catp")["cases"], ids=lambda c: f"ds{c['downsample']}")
def test_reproduces_the_official_selection(case, weighted):
    """Official ``cross_attention_pruning(_with_image_weight)`` (see the fixture)."""
    fx = load("catp")
    ca = tensor(fx["cross_attn"]).transpose(0, 1)  # [L, B, ...] -> [B, L, H, Nq, M]
    x = torch.randn(ca.shape[0], 1 + ca.shape[3], 4)
    state = {"cross_attn": ca, "image_attn": tensor(fx["image_attn"])}
    signals = Signals(prefix=1, size=torch.ones(*x.shape[:2], 1), state=state)
    out = CATP(downsample=case["downsample"], image_weight=weighted)(x, signals)
    kept = case["kept_weighted" if weighted else "kept"]
    assert out.index[:, 1:].tolist() == [[i + 1 for i in row] for row in kept]


def test_without_cross_attention_the_layers_self_attention_stands_in():
    x = tokens()
    signals = make_signals(x)
    fallback = CATP(downsample=2, image_weight=True)(x, signals)
    explicit = CATP(downsample=2, image_weight=True)(
        x,
        with_state(x, cross_attn=signals.attn[:, None, :, 1:, :], image_attn=signals.attn),
    )
    assert torch.equal(fallback.index, explicit.index)


def test_rejects_maps_with_the_wrong_number_of_query_rows():
    x = tokens()
    with pytest.raises(ValueError, match="query rows"):
        CATP(downsample=2)(x, with_state(x, cross_attn=cross_attn()[..., :-1, :]))


def test_llava_host_cached_decoding_equals_recomputation():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=CATP(downsample=4))
    g = torch.Generator().manual_seed(1)
    state = {"cross_attn": torch.randn(B, 2, 3, 16, 10, generator=g).softmax(-1)}
    keys = assert_cached_decoding_matches(host, *llava_inputs(), state=state)
    assert keys == 2 + 16 // 4 + 5
