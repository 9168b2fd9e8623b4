"""DART's own invariants: pivots by key norm, the least duplicated image tokens kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference import dart as dart_module
from reference.dart import DART, dart_keep
from reference.hosts.llava import TINY, LlavaHost, LLMSignals
from tests.reference.conftest import assert_cached_decoding_matches, llava_inputs
from tests.reference.fixtures import load, tensor

GOLDEN = load("dart")


def signals_for(case: dict, hidden: torch.Tensor, keys: torch.Tensor | None) -> LLMSignals:
    n = hidden.shape[1]
    signals = LLMSignals(
        image_start=case["image_start"],
        image_len=case["image_len"],
        valid=torch.ones(1, n, dtype=torch.bool),
    )
    signals.keys = keys  # the layer's keys after RoPE, where a host exposes them
    return signals


def method_for(case: dict) -> DART:
    return DART(
        tokens=case["max_num_trunction"],
        ratio=case["reduction_ratio"],
        pivot_image=case["pivot_image_token"],
        pivot_text=case["pivot_text_token"],
    )


@pytest.mark.parametrize(
    "case", GOLDEN["cases"], ids=lambda c: f"s{c['image_start']}m{c['image_len']}"
)
def test_reproduces_the_official_golden_fixture(case):
    """The official ``get_retained_image_token`` keeps the same image tokens."""
    hidden, keys = tensor(case["hidden"])[None], tensor(case["keys"])[None]
    out = method_for(case)(hidden, signals_for(case, hidden, keys))
    start, length, n = case["image_start"], case["image_len"], hidden.shape[1]
    kept = out.index[0, start : out.index.shape[1] - (n - start - length)]
    assert kept.tolist() == case["keep"]
    assert set(case["retained"]) == set(case["keep"])
    torch.testing.assert_close(out.x, hidden[:, out.index[0]], atol=1e-5, rtol=1e-5)
    assert (out.index[0, :start] == torch.arange(start)).all()  # text before and after stays


def test_the_official_pivot_order_decides(monkeypatch):
    """Visiting the pivots in ascending order instead keeps other tokens (case 3)."""
    case = GOLDEN["cases"][2]
    hidden, keys = tensor(case["hidden"])[None], tensor(case["keys"])[None]
    monkeypatch.setattr(dart_module, "official_pivot_order", sorted)
    out = method_for(case)(hidden, signals_for(case, hidden, keys))
    assert out.index[0].tolist() != sorted(
        list(range(case["image_start"]))
        + case["keep"]
        + list(range(case["image_start"] + case["image_len"], hidden.shape[1]))
    )


def test_each_pivot_keeps_the_least_similar_tokens_left():
    g = torch.Generator().manual_seed(0)
    hidden, key_norm = torch.randn(30, 8, generator=g), torch.rand(30, generator=g)
    image, text = torch.arange(2, 22), torch.arange(22, 30)
    kept = dart_keep(hidden, key_norm, image, text, 2, 1, 3)
    pivots = image[key_norm[image].topk(2).indices].tolist()
    text_pivot = int(text[key_norm[text].argmax()])
    assert kept[:2] == pivots and len(kept) == 2 + 3 * 3 == len(set(kept))
    left = [int(i) for i in image if int(i) not in pivots]
    for start, p in zip(
        (2, 5, 8), dart_module.official_pivot_order([*pivots, text_pivot]), strict=True
    ):
        sim = F.cosine_similarity(hidden[p], hidden[left], dim=-1)
        expected = {left[j] for j in sim.argsort()[:3].tolist()}
        assert set(kept[start : start + 3]) == expected
        left = [i for i in left if i not in expected]


def test_paper_token_counts():
    # LLaVA-1.5 defaults: max_num_trunction 128 over 4 + 4 pivots: 16 each, plus 4 pivots.
    assert DART().image_budget(576) == (4 + 4 * 16, 4 + 8 * 16)
    assert DART().kept(576, 40) == 132
    assert DART(tokens=None).kept(576, 40) == 4 + 8 * 15  # 576 * 0.222 // 8 = 15
    assert [DART(tokens=t).kept(576, 40) for t in (64, 192)] == [68, 196]
    assert DART.paper_placement(32)[1].tokens == 128


def test_the_hosts_final_norm_is_applied_before_the_cosines_by_default():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    images, prefix, suffix, valid = llava_inputs()
    weight = torch.rand(TINY.hidden, generator=torch.Generator().manual_seed(0)) ** 4
    traces = {}
    with torch.no_grad():
        host.norm.weight.copy_(weight)
        for name, norm in [("default", None), ("host", host.norm), ("none", lambda h: h)]:
            host.apply(llm={1: DART(tokens=8, pivot_image=2, pivot_text=2, norm=norm)})
            host.prefill(images, prefix, suffix, valid)
            traces[name] = host.last_trace[0]
    assert torch.equal(traces["default"], traces["host"])
    assert not torch.equal(traces["default"], traces["none"])
    assert not any(k.startswith("llm_reducers") for k in host.state_dict())


def test_llava_host_cached_decoding_equals_recomputing_the_pruned_sequence():
    images, prefix, suffix, valid = llava_inputs()
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(llm={1: DART(tokens=8, pivot_image=2, pivot_text=2)})
    with torch.no_grad():
        host.prefill(images, prefix, suffix, valid)
    assert host.last_trace[0].shape[1] == 2 + 2 + 4 * 2 + 5
    assert_cached_decoding_matches(host, images, prefix, suffix, valid)
