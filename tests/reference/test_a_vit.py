"""A-ViT's own invariants: tokens halt once their cumulative score reaches 1 - eps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from reference import vit
from reference.a_vit import AViT
from tests.reference.conftest import B, N, make_signals, tiny_host, tokens


def scores(x: torch.Tensor, scale: float, center: float) -> torch.Tensor:
    return torch.sigmoid(scale * x[..., 0] - center)


def test_tokens_halt_once_the_cumulative_score_passes_one_minus_eps():
    method = AViT(gate_scale=2.0, gate_center=0.0, eps=0.3).eval()
    x1 = tokens(seed=1)
    signals = make_signals(x1)
    out1 = method(x1, signals)
    h1 = scores(x1, 2.0, 0.0)
    for i in range(B):
        kept = out1.index[i][out1.index[i] >= 0]
        expected = [0] + [j for j in range(1, N) if h1[i, j] < 0.7]
        assert kept.tolist() == expected
    x2 = torch.randn(out1.x.shape, generator=torch.Generator().manual_seed(2))
    out2 = method(x2, replace(signals, size=out1.size))
    total = h1.gather(1, out1.index.clamp_min(0)) + scores(x2, 2.0, 0.0)  # [B, N1]
    for i in range(B):
        running = out1.index[i] >= 0
        kept = out2.index[i][out2.index[i] >= 0]
        expected = [
            j for j in range(out1.num_tokens) if running[j] and (j == 0 or total[i, j] < 0.7)
        ]
        assert kept.tolist() == expected


def test_halted_prefix_tokens_stay_in_place():
    x = tokens()
    x[..., 0] = 10.0  # every token halts at once, CLS included (official)
    signals = make_signals(x, prefix=2)
    method = AViT(gate_scale=10.0, gate_center=0.0).eval()
    out = method(x, signals)
    assert out.num_tokens == 2
    torch.testing.assert_close(out.x, x[:, :2])
    assert not signals.state["a_vit"]["running"].any()
    cumulative = signals.state["a_vit"]["cumulative"].clone()
    method(out.x, replace(signals, size=out.size))  # a halted token never runs again
    assert not signals.state["a_vit"]["running"].any()
    torch.testing.assert_close(signals.state["a_vit"]["cumulative"], cumulative)


def test_pin_prefix_keeps_prefix_tokens_running():
    x = tokens()
    x[..., 0] = 10.0
    for pin in (False, True):
        signals = make_signals(x, prefix=2)
        AViT(gate_scale=10.0, gate_center=0.0, pin_prefix=pin).eval()(x, signals)
        running = signals.state["a_vit"]["running"]
        assert running.shape == (B, 2) and bool(running.all()) == pin


@pytest.mark.parametrize("pin_prefix", [False, True])
def test_ponder_cost_is_blocks_run_plus_remainder(pin_prefix):
    """Official ``rho_token``: CLS ponders and halts like any token unless pinned."""
    method = AViT(gate_scale=2.0, gate_center=0.0, eps=0.3, pin_prefix=pin_prefix).train()
    x1, x2 = tokens(seed=1).requires_grad_(True), tokens(seed=2)
    signals = make_signals(x1)
    first = method(x1, signals)
    method(x2, signals)
    h1, h2 = scores(x1.detach(), 2.0, 0.0), scores(x2, 2.0, 0.0)
    halted1 = h1 >= 0.7
    halted2 = ~halted1 & (h1 + h2 >= 0.7)
    if pin_prefix:
        halted1[:, 0] = halted2[:, 0] = False
    else:
        assert halted1[:, 0].any() or halted2[:, 0].any(), "the inputs must let a CLS halt"
    expected = torch.where(halted1, 2.0, torch.where(halted2, 3.0 - h1, 2.0))
    ponder = signals.state["a_vit"]["ponder"]
    torch.testing.assert_close(ponder, expected)
    assert first.num_tokens == N and torch.equal(first.mask.bool(), ~halted1)
    ponder.sum().backward()  # the ponder loss reaches the tokens through h
    assert x1.grad is not None and x1.grad[..., 0].abs().sum() > 0


def test_empty_slots_are_marked_and_never_come_back():
    method = AViT(gate_scale=2.0, gate_center=0.0, eps=0.3).eval()
    x = tokens(seed=1)
    out = method(x, make_signals(x))
    empty = out.index == -1
    assert empty.any(), "the test input should give different counts per image"
    assert (out.size[..., 0][empty] == 0).all() and (out.x[empty] == 0).all()
    assert torch.equal(out.mask.bool(), ~empty)
    still = AViT(gate_center=1e4).eval()(out.x, replace(make_signals(out.x), size=out.size))
    assert still.num_tokens == int((~empty).sum(1).max())
    assert torch.equal(still.index == -1, empty[:, : still.num_tokens])


def test_cap_halts_the_largest_cumulative_scores_first(x):
    out = AViT(gate_scale=1.0, gate_center=3.0, max_keep=0.5).eval()(x, make_signals(x))
    h = scores(x, 1.0, 3.0)[:, 1:]
    assert (h < 0.99).all()  # nothing halts on its own
    expected = h.topk(8, dim=1, largest=False).indices.sort(dim=1).values + 1
    assert torch.equal(out.index[:, 1:], expected)


def test_an_image_gets_the_same_logits_in_any_batch():
    host = tiny_host()
    method = AViT(gate_scale=10.0, gate_center=0.0, max_keep=0.75).eval()
    vit.apply(host, {layer: method for layer in (1, 2, 3)}, proportional_attn=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    together = host(images)
    counts = set()
    for i in range(3):
        torch.testing.assert_close(host(images[i : i + 1])[0], together[i], rtol=1e-4, atol=1e-5)
        counts.add(tuple(vit.tokens_after(host)))
    assert len(counts) > 1, "the images should keep different counts"
