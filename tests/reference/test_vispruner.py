"""VisPruner's own invariants: important tokens by [CLS] attention, diverse ones de-duplicated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference.core import Signals
from reference.hosts.llava import TINY, LlavaHost
from reference.vispruner import VisPruner, vispruner_select
from tests.reference.conftest import (
    B,
    N,
    assert_cached_decoding_matches,
    llava_inputs,
    make_signals,
    tokens,
)
from tests.reference.fixtures import load, tensor

GOLDEN = load("vispruner")


def _select_by_loop(v: torch.Tensor, score: torch.Tensor, t: int, ratio: float) -> list[int]:
    """Steps 1 and 2 written out for one sample ``v [M, C]``."""
    order = sorted(range(len(score)), key=lambda j: -float(score[j]))
    important, residual = order[: int(t * ratio)], order[int(t * ratio) :]
    unit = F.normalize(v, dim=-1)
    while len(residual) > t - len(important):
        a, b = residual[::2], residual[1::2]
        best = {i: max(float(unit[i] @ unit[j]) for j in b) for i in a}
        by_similarity = sorted(a, key=lambda i: -best[i])
        r = min(8, len(residual) - (t - len(important)))
        residual = by_similarity[r:] + b
    return important + residual


def test_keeps_the_important_then_the_least_duplicated_tokens():
    x = tokens(seed=1)
    signals = make_signals(x, seed=1)
    out = VisPruner(tokens=6, important_ratio=0.5)(x, signals)
    assert out.num_tokens == 1 + 6
    score = signals.cls_attn[:, :, 1:].mean(1)
    for i in range(B):
        expected = sorted(p + 1 for p in _select_by_loop(x[i, 1:], score[i], 6, 0.5))
        assert out.index[i, 1:].tolist() == expected
        torch.testing.assert_close(out.x[i, 1:], x[i, expected])
        top3 = set((score[i].topk(3).indices + 1).tolist())
        assert top3 <= set(expected)  # the important half
    assert (out.assign == -1).sum(1).eq(N - 7).all()


def test_ratio_one_is_attention_only_and_zero_is_diversity_only():
    x = tokens(seed=2)
    signals = make_signals(x, seed=2)
    score = signals.cls_attn[:, :, 1:].mean(1)
    out = VisPruner(tokens=5, important_ratio=1.0)(x, signals)
    assert torch.equal(out.index[:, 1:] - 1, score.topk(5, dim=1).indices.sort(1).values)
    out = VisPruner(tokens=5, important_ratio=0.0)(x, signals)
    expected = sorted(p + 1 for p in _select_by_loop(x[0, 1:], score[0], 5, 0.0))
    assert out.index[0, 1:].tolist() == expected


def test_budgets_the_official_code_cannot_run_still_keep_the_count():
    g = torch.Generator().manual_seed(0)
    v, score = torch.randn(2, 15, 4, generator=g), torch.rand(2, 15, generator=g)
    for t in range(1, 15):  # odd residual counts, more to remove than set A holds
        keep = vispruner_select(v, score, t, 0.5)
        assert keep.shape == (2, t) and all(len(set(k.tolist())) == t for k in keep)


def test_paper_token_counts():
    assert VisPruner().budget(577, 1) == (129, 129)  # the README's 64 important + 64 diverse
    assert VisPruner(tokens=100).budget(N, 1) == (N, N)
    for keep in (32, 64, 128):
        method = VisPruner.bench_setting(keep, 576, TINY)["vision"]
        assert method.budget(577, 1) == (1 + keep, 1 + keep)


def test_llava_host_cached_decoding_equals_recomputing_the_pruned_sequence():
    images, prefix, suffix, valid = llava_inputs()
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=VisPruner(tokens=6))
    vis, _ = host.encode_images(images, {})
    assert vis.shape == (3, 6, TINY.hidden)
    assert_cached_decoding_matches(host, images, prefix, suffix, valid)


@pytest.mark.parametrize(
    "case",
    GOLDEN["cases"],
    ids=lambda c: f"b{len(c['x'])}t{c['visual_token_num']}r{c['important_ratio']}",
)
def test_reproduces_the_official_golden_fixture(case):
    """The official ``encode_images`` keeps the same patches of every sample."""
    x, cls_attn = tensor(case["x"]), tensor(case["cls_attn"])
    b, n, _ = x.shape
    signals = Signals(prefix=1, size=torch.ones(b, n, 1), cls_attn=cls_attn)
    method = VisPruner(tokens=case["visual_token_num"], important_ratio=case["important_ratio"])
    out = method(x, signals)
    assert (out.index[:, 1:] - 1).tolist() == case["keep"]
    expected = torch.stack([x[i, 1:][k] for i, k in enumerate(case["keep"])])
    torch.testing.assert_close(out.x[:, 1:], expected, atol=1e-5, rtol=1e-5)


def test_empty_slots_of_an_earlier_step_are_left_out():
    x = tokens(seed=4)
    signals = make_signals(x, seed=4)
    signals.present = torch.ones(B, N, dtype=torch.bool)
    signals.present[0, -5:] = False  # sample 0 was padded with 5 empty slots
    out = VisPruner(tokens=6)(x, signals)
    alone_signals = make_signals(x[:1, :-5], seed=4)
    alone_signals.cls_attn = signals.cls_attn[:1, :, :-5]
    alone = VisPruner(tokens=6)(x[:1, :-5], alone_signals)
    assert torch.equal(out.index[0], alone.index[0])
