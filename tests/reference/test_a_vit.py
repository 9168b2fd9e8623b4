"""A-ViT's own invariants: tokens halt once their cumulative score reaches 1 - eps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from reference.a_vit import AViT, halting_scores
from reference.core import Signals
from reference.hosts import vit
from tests.reference.conftest import B, N, make_signals, tiny_host, tokens
from tests.reference.fixtures import load, tensor

GOLDEN = load("a_vit")


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


def _golden_method(case: dict, **kwargs) -> AViT:
    return AViT(
        gate_scale=case["gate_scale"], gate_center=case["gate_center"], eps=case["eps"], **kwargs
    )


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"seed{c['seed']}")
def test_reproduces_the_official_halting_golden_fixture(case):
    """Training: chained on the official block outputs, the halting scores, cumulative
    scores, remainders, ponder costs and running masks are the official ones, block by
    block; the CLS token halts as in the official code (``pin_prefix=False``)."""
    method = _golden_method(case).train()
    b, n, _ = tensor(case["block_out"][0]).shape
    signals = Signals(prefix=1, size=torch.ones(b, n, 1))
    ran = torch.ones(b, n, dtype=torch.bool)  # tokens the block that just ran processed
    for x, h, step in zip(case["block_out"], case["halting"], case["steps"], strict=True):
        x = tensor(x)
        scores = halting_scores(x, 1, method.gate_scale, method.gate_center)
        torch.testing.assert_close(scores, tensor(h), atol=1e-5, rtol=1e-5)
        out = method(x, signals)
        state, running = signals.state["a_vit"], tensor(step["running"], torch.bool)
        assert torch.equal(out.mask.bool(), running) and torch.equal(state["running"], running)
        # The official c_token keeps adding h to halted tokens (h >= 0: they stay halted).
        cumulative = tensor(step["cumulative"])
        torch.testing.assert_close(state["cumulative"][ran], cumulative[ran], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state["remainder"], tensor(step["remainder"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(state["ponder"], tensor(step["ponder"]), atol=1e-5, rtol=1e-5)
        ran = running
    assert not running[:, 0].any(), "the fixture's CLS tokens halt"


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"seed{c['seed']}")
def test_inference_keeps_the_official_running_tokens(case):
    """Inference drops the tokens the official mask blocks; a halted CLS stays in place."""
    method = _golden_method(case).eval()
    outputs = [tensor(x) for x in case["block_out"]]
    b, n, c = outputs[0].shape
    signals = Signals(prefix=1, size=torch.ones(b, n, 1))
    source = torch.arange(n).expand(b, n)  # the input token behind each slot
    x = outputs[0]
    for i, step in enumerate(case["steps"]):
        out = method(x, signals)
        source = torch.where(out.index >= 0, source.gather(1, out.index.clamp_min(0)), -1)
        running = tensor(step["running"], torch.bool)
        for j in range(b):
            kept = source[j][source[j] > 0].tolist()
            assert kept == (running[j, 1:].nonzero()[:, 0] + 1).tolist()
        assert torch.equal(signals.state["a_vit"]["running"][:, 0], running[:, 0])
        if i + 1 < len(outputs):  # the next official block output, at the kept slots
            nxt = outputs[i + 1].gather(1, source.clamp_min(0)[..., None].expand(-1, -1, c))
            x = nxt * (source >= 0)[..., None]
            signals = replace(signals, size=out.size)


def test_pinning_the_prefix_departs_from_the_golden_fixture():
    case = GOLDEN["cases"][0]
    method = _golden_method(case, pin_prefix=True).train()
    b, n, _ = tensor(case["block_out"][0]).shape
    signals = Signals(prefix=1, size=torch.ones(b, n, 1))
    for x in case["block_out"]:
        out = method(tensor(x), signals)
    official = tensor(case["steps"][-1]["running"], torch.bool)
    assert out.mask[:, 0].bool().all() and not official[:, 0].any()
    torch.testing.assert_close(out.mask[:, 1:].bool(), official[:, 1:])
