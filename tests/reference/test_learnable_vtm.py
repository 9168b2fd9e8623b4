"""Learnable VTM's own invariants: saliency partition, windowed matching, the auxiliary path."""

from __future__ import annotations

import torch

from reference.core import Signals
from reference.learnable_vtm import LearnableVTM, merge_into, saliency_guided_attention
from tests.reference.conftest import make_signals

P, L = 4, 2  # tokens per frame, frames per window: windows of 8 tokens


def method(**kwargs) -> LearnableVTM:
    torch.manual_seed(0)
    config = dict(dim=32, gamma=2, ratio=0.8, frame_tokens=P, window_frames=L) | kwargs
    return LearnableVTM(**config).eval()


def inputs(n: int = 1 + 16, seed: int = 0) -> tuple[torch.Tensor, Signals]:
    x = torch.randn(2, n, 32, generator=torch.Generator().manual_seed(seed))
    return x, make_signals(x, prefix=1, seed=seed)


def naive_plan(saliency, keys, prefix, length, num_targets, r):
    """One sample, one window at a time: the most salient tokens are targets, and the
    ``r`` sources closest (cosine) to some target merge into that target."""
    plan = {}
    for w in range((saliency.shape[0] - prefix) // length):
        lo = prefix + w * length
        ids = list(range(lo, lo + length))
        targets = sorted(ids, key=lambda i: -saliency[i].item())[:num_targets]
        sources = [i for i in ids if i not in targets]
        unit = keys / keys.norm(dim=-1, keepdim=True)
        best = {i: max(targets, key=lambda t: (unit[i] @ unit[t]).item()) for i in sources}
        score = {i: (unit[i] @ unit[best[i]]).item() for i in sources}
        for i in sorted(sources, key=lambda i: -score[i])[:r]:
            plan[i] = best[i]
    return plan


def test_inference_merges_sources_into_their_most_similar_salient_target():
    m = method()
    x, signals = inputs()
    out = m(x, signals)
    saliency = m.saliency(x)[..., 0].sigmoid()
    for i in range(2):
        plan = naive_plan(saliency[i], signals.keys[i], 1, P * L, P * L // 2, 3)
        merged = {j for j in range(17) if out.index[i, out.assign[i, j]] != j}
        assert merged == set(plan)
        for src, dst in plan.items():
            assert out.index[i, out.assign[i, src]] == dst


def test_the_most_salient_tokens_of_each_window_survive():
    m = method(ratio=1.0)
    x, signals = inputs(seed=1)
    out = m(x, signals)
    saliency = m.saliency(x)[..., 0].sigmoid()[:, 1:].reshape(2, 2, P * L)  # [B, W, L]
    top = saliency.topk(P * L // 2, dim=-1).indices + 1 + P * L * torch.arange(2)[:, None]
    # With ratio 1 every source merges: exactly the targets are left.
    assert torch.equal(out.index[:, 1:].sort(1).values, top.flatten(1).sort(1).values)


def test_merges_stay_inside_their_window():
    x, signals = inputs(n=1 + 16 + 3, seed=2)  # 3 trailing tokens fill no window
    out = method(ratio=1.0)(x, signals)
    window = lambda i: (i - 1) // (P * L)  # noqa: E731
    src = torch.arange(20).expand(2, -1)
    dst = out.index.gather(1, out.assign)
    assert torch.equal(window(src[:, 1:]), window(dst[:, 1:]))
    assert torch.equal(out.x[:, -3:], x[:, -3:])  # the tail passes through


def test_average_pooling_keeps_the_size_weighted_sum_and_total_size():
    x, signals = inputs(seed=3)
    signals.size = torch.rand(2, 17, 1) + 0.5
    out = method()(x, signals)
    torch.testing.assert_close((out.x * out.size).sum(1), (x * signals.size).sum(1))
    torch.testing.assert_close(out.size.sum(1), signals.size.sum(1))
    assert out.x.shape[1] == 17 - 2 * 3


def test_merge_into_returns_unmerged_tokens_exactly():
    x, size = torch.randn(1, 6, 4), torch.full((1, 6, 1), 3.0)
    out = merge_into(x, size, torch.tensor([[4]]), torch.tensor([[1]]))
    assert torch.equal(out.index, torch.tensor([[0, 1, 2, 3, 5]]))
    assert torch.equal(out.x[:, [0, 2, 3, 4]], x[:, [0, 2, 3, 5]])
    torch.testing.assert_close(out.x[0, 1], (x[0, 1] + x[0, 4]) / 2)
    assert out.size[0, 1, 0] == 6.0


def test_saliency_guided_attention_adds_log_saliency_to_the_logits():
    torch.manual_seed(4)
    logits, s = torch.randn(2, 3, 5, 5), torch.rand(2, 5) + 0.05
    expected = (logits + s.log()[:, None, None, :]).softmax(-1)
    torch.testing.assert_close(saliency_guided_attention(logits.softmax(-1), s), expected)


def test_training_adds_the_auxiliary_path_and_trains_the_saliency_head():
    m = method()
    x, signals = inputs(seed=5)
    hard = m(x, signals)
    soft = m.train()(x, signals)
    # Same merge plan and token count; only the auxiliary term differs.
    assert torch.equal(soft.index, hard.index) and torch.equal(soft.assign, hard.assign)
    assert not torch.allclose(soft.x[:, 1:], hard.x[:, 1:])
    torch.testing.assert_close(soft.x[:, :1], x[:, :1])
    soft.x.square().mean().backward()
    assert m.saliency.weight.grad is not None and m.saliency.weight.grad.abs().sum() > 0
