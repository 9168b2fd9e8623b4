"""VisionZip's own invariants: dominant tokens by [CLS] attention, contextual merging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference.core import Signals
from reference.hosts.llava import TINY, LlavaHost
from reference.visionzip import VisionZip
from tests.reference.conftest import (
    B,
    N,
    assert_cached_decoding_matches,
    llava_inputs,
    make_signals,
    tokens,
)
from tests.reference.fixtures import load, tensor

GOLDEN = load("visionzip")


def test_dominant_tokens_are_the_top_k_by_summed_cls_attention_in_order():
    x = tokens()
    signals = make_signals(x)
    out = VisionZip(dominant=5, contextual=3)(x, signals)
    score = signals.cls_attn[:, :, 1:].sum(1)  # [B, N - 1]
    expected = score.topk(5, dim=1).indices.sort(dim=1).values + 1
    assert out.num_tokens == 1 + 5 + 3
    assert torch.equal(out.index[:, 1:6], expected)
    torch.testing.assert_close(
        out.x[:, 1:6], x.gather(1, expected[..., None].expand(-1, -1, x.shape[-1]))
    )


def _contextual_by_loop(x, signals, dominant, contextual):
    """Step 2 written out per sample: spaced targets, nearest target by key cosine."""
    result = []
    for i in range(x.shape[0]):
        top = signals.cls_attn[i, :, 1:].sum(0).topk(dominant).indices + 1
        rest = [j for j in range(1, x.shape[1]) if j not in set(top.tolist())]
        step = max(1, len(rest) // contextual)
        targets = rest[::step][:contextual]
        others = [j for j in rest if j not in targets]
        metric = F.normalize(signals.keys[i], dim=-1)
        nearest = (metric[others] @ metric[targets].T).argmax(1).tolist()
        rows = []
        for t_slot, t in enumerate(targets):
            members = [o for o, s in zip(others, nearest, strict=True) if s == t_slot]
            extra = x[i, members].mean(0) if members else torch.zeros_like(x[i, t])
            rows.append((t, x[i, t] + extra, 1 + len(members)))
        result.append(rows)
    return result


def test_contextual_tokens_are_target_plus_mean_of_their_nearest_tokens():
    x = tokens(seed=1)
    signals = make_signals(x, seed=1)
    out = VisionZip(dominant=4, contextual=3)(x, signals)
    for i, rows in enumerate(_contextual_by_loop(x, signals, 4, 3)):
        for slot, (target, value, size) in enumerate(rows, start=1 + 4):
            assert out.index[i, slot] == target
            torch.testing.assert_close(out.x[i, slot], value)
            assert out.size[i, slot, 0] == size
            assert (out.assign[i] == slot).sum() == size


def test_every_patch_is_accounted_for_once():
    x = tokens(seed=3)
    out = VisionZip(dominant=3, contextual=4)(x, make_signals(x, seed=3))
    assert (out.assign >= 0).all()  # nothing is dropped: it is kept or merged
    assert out.size.sum(1).eq(N).all()
    slots = torch.arange(out.num_tokens).expand(B, -1)
    assert torch.equal(out.assign.gather(1, out.index), slots)  # kept tokens map to themselves


def test_degenerate_budgets():
    x = tokens()
    signals = make_signals(x)
    pruned = VisionZip(dominant=5, contextual=0)(x, signals)
    assert pruned.num_tokens == 6 and (pruned.assign == -1).sum(1).eq(N - 6).all()
    merged = VisionZip(dominant=0, contextual=4)(x, signals)  # contextual tokens only
    assert merged.num_tokens == 5 and merged.size.sum(1).eq(N).all()
    whole = VisionZip(dominant=10, contextual=100)(x, signals)  # covers every token
    torch.testing.assert_close(whole.x, x)
    assert VisionZip(dominant=10, contextual=100).budget(N, 1) == (N, N)


def test_bench_setting_keeps_the_requested_visual_tokens():
    for keep, contextual in ((64, 10), (128, 20), (192, 30)):
        method = VisionZip.bench_setting(keep, 576, TINY)["vision"]
        assert method.contextual == contextual
        assert method.budget(577, 1) == (1 + keep, 1 + keep)  # CLS is dropped by the host


def test_llava_host_cached_decoding_equals_recomputing_the_pruned_sequence():
    images, prefix, suffix, valid = llava_inputs()
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=VisionZip(dominant=4, contextual=2))
    vis, reduction = host.encode_images(images, {})
    assert vis.shape == (3, 6, TINY.hidden) and reduction.size.sum(1).eq(N).all()
    assert_cached_decoding_matches(host, images, prefix, suffix, valid)


@pytest.mark.parametrize(
    "case", GOLDEN["cases"], ids=lambda c: f"b{len(c['x'])}d{c['dominant']}c{c['contextual']}"
)
def test_reproduces_the_official_forward_golden_fixture(case):
    """The official tower keeps the same dominant patches and builds the same contextual tokens."""
    x, official = tensor(case["x"]), tensor(case["out"])
    b, n, _ = x.shape
    signals = Signals(
        prefix=1,
        size=torch.ones(b, n, 1),
        cls_attn=tensor(case["cls_attn"]),
        keys=tensor(case["keys"]),
    )
    d = case["dominant"]  # the official _info["dominant"]: patches, CLS kept besides
    out = VisionZip(dominant=d, contextual=case["contextual"])(x, signals)
    assert out.num_tokens == official.shape[1] == 1 + d + case["contextual"]
    assert torch.equal(out.index[:, 1 : 1 + d], torch.tensor(case["dominant_index"]))
    torch.testing.assert_close(out.x, official, atol=1e-5, rtol=1e-5)
