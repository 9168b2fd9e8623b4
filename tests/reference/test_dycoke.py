"""DyCoke's own invariants: temporal token merging and dynamic KV-cache pruning."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from reference.core import Signals
from reference.dycoke import DyCoke, dycoke_decode_step
from reference.hosts.llava import TINY, LlavaHost
from tests.reference.conftest import assert_cached_decoding_matches, llava_inputs
from tests.reference.fixtures import load, tensor

T, P, C = 8, 3, 8


def video(b: int = 2, t: int = T, seed: int = 0) -> torch.Tensor:
    """``[b, 1 + t P, C]``: CLS and random frames where about half the patches repeat."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(b, t, P, C, generator=g)
    same = torch.rand(b, t, P, generator=g) < 0.5
    for i in range(1, t):
        noise = 0.1 * torch.randn(b, P, C, generator=g)
        frames[:, i][same[:, i]] = (frames[:, i - 1] + noise)[same[:, i]]
    return torch.cat([torch.randn(b, 1, C, generator=g), frames.flatten(1, 2)], 1)


def signals(x: torch.Tensor) -> Signals:
    return Signals(prefix=1, size=torch.ones(x.shape[0], x.shape[1], 1))


def naive_keep(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """The official loops written out per frame: ``[B, T, P]`` keep mask."""
    b = x.shape[0]
    frames = x[:, 1:].reshape(b, T, P, C)
    keep = torch.ones(b, T, P, dtype=torch.bool)
    k = int((1 - ratio) * P)
    pairs = [(i, i + 1) for i in range(0, T - 1, 2)] + [(i, i + 2) for i in range(0, T - 4, 4)]
    for s in range(b):
        for pivot, target in pairs:
            sim = [
                F.cosine_similarity(frames[s, target, p], frames[s, pivot, p], 0) for p in range(P)
            ]
            low = sorted(range(P), key=lambda p, sim=sim: sim[p])[:k]
            keep[s, target] = torch.tensor([p in low for p in range(P)])
    return keep


def test_keeps_the_least_similar_tokens_of_pruned_frames():
    x = video()
    out = DyCoke(frame_tokens=P, ratio=0.4)(x, signals(x))
    keep = naive_keep(x, 0.4)
    expected = torch.cat([torch.ones(2, 1, dtype=torch.bool), keep.flatten(1)], 1)  # CLS
    assert torch.equal(out.index, expected.nonzero()[:, 1].view(2, -1))
    # Pairs (0,1) (2,3) (4,5) (6,7) and window 0 (frame 2 vs 0); the official range
    # skips window 4..7, so frame 6 stays whole.
    assert keep[:, [0, 4, 6]].all() and not keep[:, 2].all()
    assert out.num_tokens == DyCoke(frame_tokens=P, ratio=0.4).budget(x.shape[1], 1)[0]
    assert out.num_tokens == 1 + T * P - 5 * (P - int(0.6 * P))


def test_dropped_tokens_are_assigned_to_their_pivot():
    x = video(seed=1)
    out = DyCoke(frame_tokens=P, ratio=0.7)(x, signals(x))
    assert (out.assign >= 0).all() and out.size.sum(1).eq(x.shape[1]).all()
    keep = naive_keep(x, 0.7)
    for b in range(2):
        for t in range(T):
            for p in range(P):
                if keep[b, t, p]:
                    continue
                pivot = t - 1 if t % 2 else t - 2  # frame 4k + 2 points at 4k
                if pivot % 4 == 2 and not keep[b, pivot, p]:
                    pivot -= 2  # 4k + 3 -> dropped 4k + 2 -> 4k
                slot = out.assign[b, 1 + t * P + p]
                assert out.index[b, slot] == 1 + pivot * P + p


def test_odd_last_frame_and_tail_are_carried_through():
    x = video(t=T)[:, : 1 + 3 * P + 2]  # three frames and two tail tokens
    out = DyCoke(frame_tokens=P, ratio=1.0)(x, signals(x))
    n = x.shape[1]
    assert out.num_tokens == n - P  # only frame 1 goes
    torch.testing.assert_close(out.x[:, -(P + 2) :], x[:, -(P + 2) :])


def test_llava_host_cached_decoding_equals_recomputing_the_pruned_sequence():
    images, prefix, suffix, valid = llava_inputs()
    torch.manual_seed(0)
    # The 16 patches read as 4 frames of 4 tokens (frame-major).
    host = LlavaHost(TINY).eval().apply(vision=DyCoke(frame_tokens=4, ratio=0.5))
    vis, _ = host.encode_images(images, {})
    assert vis.shape == (3, 12, TINY.hidden)
    assert_cached_decoding_matches(host, images, prefix, suffix, valid)


@torch.no_grad()
def test_kv_pruning_hides_unselected_image_keys_from_later_layers():
    images, prefix, suffix, valid = llava_inputs()
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    logits, cache = host.prefill(images, prefix, suffix, valid)
    token = logits.argmax(-1)
    masked, plain = copy.deepcopy(cache), copy.deepcopy(cache)
    state: dict = {}
    got = dycoke_decode_step(host, token, cache, 2, 16, layer=2, ratio=0.75, state=state)
    pruned = state["pruned"]
    assert pruned.sum(1).eq(16 - 4).all()
    # The same step with those keys masked out of layers >= 2 by hand.
    for layer_cache in masked["layers"][2:]:
        layer_cache["valid"] = layer_cache["valid"].clone()
        layer_cache["valid"][:, 2:18] &= ~pruned
    torch.testing.assert_close(got, host.decode(token, masked), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, host.decode(token, plain), rtol=1e-4, atol=1e-5)
    # A step whose attention did not change (threshold below any similarity) uses the
    # whole cache, as in the official code; the first step always prunes.
    full = copy.deepcopy(cache)
    step2 = dycoke_decode_step(host, token, cache, 2, 16, layer=2, threshold=-2.0, state=state)
    torch.testing.assert_close(step2, host.decode(token, full), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_kv_pruning_with_zero_ratio_is_plain_decoding():
    images, prefix, suffix, valid = llava_inputs()
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    logits, cache = host.prefill(images, prefix, suffix, valid)
    token = logits.argmax(-1)
    plain = host.decode(token, copy.deepcopy(cache))
    torch.testing.assert_close(dycoke_decode_step(host, token, cache, 2, 16, ratio=0.0), plain)


GOLDEN = load("dycoke")


@pytest.mark.parametrize(
    "case", GOLDEN["cases"], ids=lambda c: f"t{c['frames']}-p{c['frame_tokens']}"
)
def test_reproduces_the_official_temporal_merging_golden_fixture(case):
    """Same kept tokens as the official ``dycole_ttm``, per video, in the official order (a
    pruned frame by increasing similarity); an odd last frame is carried through where the
    official loop drops it. ``order="spatial"`` keeps the same tokens in spatial order."""
    x = tensor(case["x"])
    b, n, _ = x.shape
    p = case["frame_tokens"]
    signals = Signals(prefix=0, size=torch.ones(b, n, 1))
    out = DyCoke(frame_tokens=p, ratio=case["ratio"])(x, signals)
    spatial = DyCoke(frame_tokens=p, ratio=case["ratio"], order="spatial")(x, signals)
    carried = n - n // (2 * p) * 2 * p  # the official code drops an odd last frame
    tail = torch.arange(n - carried, n)
    for v in range(b):
        official = torch.tensor(case["index"][v])
        assert torch.equal(out.index[v], torch.cat([official, tail]))
        torch.testing.assert_close(
            out.x[v, : len(official)], tensor(case["out"][v]), atol=1e-5, rtol=1e-5
        )
        assert torch.equal(spatial.index[v], torch.cat([official.sort().values, tail]))
    if int((1 - case["ratio"]) * p) > 1:  # more than one kept token per pruned frame
        assert not torch.equal(out.index, spatial.index)  # the case really reorders
    torch.testing.assert_close(spatial.size.sum(1), out.size.sum(1))
    # Both follow the tokens: every input token maps to a slot holding it or its pivot.
    for red in (out, spatial):
        assert torch.equal(red.index.gather(1, red.assign) % p, torch.arange(n).expand(b, n) % p)
