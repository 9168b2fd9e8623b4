"""DivPrune's own invariants: the greedy max-min diverse subset, per sample, in the host too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference.core import Signals
from reference.divprune import DivPrune, divprune_select
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

GOLDEN = load("divprune")


def _select_by_loop(v: torch.Tensor, k: int) -> list[int]:
    """The max-min greedy written out for one sample ``v [M, C]``."""
    unit = F.normalize(v, dim=-1)
    d = 1 - unit @ unit.T
    m = v.shape[0]
    first = max(range(m), key=lambda j: min(d[i, j] for i in range(m) if i != j))
    picks = [first]
    while len(picks) < k:
        rest = [j for j in range(m) if j not in picks]
        picks.append(max(rest, key=lambda j: min(d[i, j] for i in picks)))
    return picks


def test_selects_the_greedy_max_min_subset_of_each_sample():
    x = tokens(seed=1)
    out = DivPrune(ratio=0.5)(x, make_signals(x, seed=1))
    assert out.num_tokens == 1 + 8
    for i in range(B):
        expected = sorted(p + 1 for p in _select_by_loop(x[i, 1:], 8))
        assert out.index[i, 1:].tolist() == expected
        torch.testing.assert_close(out.x[i, 1:], x[i, expected])
    assert (out.assign == -1).sum(1).eq(N - 9).all()  # pruned tokens go nowhere


def test_a_selected_token_is_never_selected_again():
    v = torch.randn(1, 3, 4).repeat(1, 3, 1)  # three tokens, each three times
    picks = divprune_select(v, 6)
    assert picks[0].unique().numel() == 6
    assert sorted(set(picks[0, :3].remainder(3).tolist())) == [0, 1, 2]  # one of each first


def test_prefix_tokens_are_not_selected_and_stay():
    x = tokens(seed=2)
    out = DivPrune(ratio=0.25)(x, make_signals(x, prefix=2, seed=2))
    assert out.num_tokens == 2 + round(0.25 * (N - 2))
    assert torch.equal(out.x[:, :2], x[:, :2])
    expected = sorted(p + 2 for p in _select_by_loop(x[0, 2:], out.num_tokens - 2))
    assert out.index[0, 2:].tolist() == expected


def test_paper_token_counts():
    # LLaVA-1.5: SUBSET_RATIO 0.098 of 576 patches keeps int(round(56.448)) = 56.
    assert DivPrune().budget(577, 1) == (57, 57)
    assert DivPrune(ratio=0.5).budget(1 + 5, 1) == (3, 3)  # round(2.5) is 2, half to even
    assert DivPrune(ratio=1.0).budget(N, 1) == (N, N)
    for keep in (64, 128, 192):
        method = DivPrune.bench_setting(keep, 576, TINY)["vision"]
        assert method.budget(577, 1) == (1 + keep, 1 + keep)


@torch.no_grad()
def test_llava_host_with_the_projector_measures_distances_where_the_official_code_does():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    images = llava_inputs()[0]
    feats, _ = host.encode_images(images, {})  # [B, 16, hidden], the projected patches
    picks = divprune_select(feats, 4).sort(1).values
    for method in (DivPrune(ratio=0.25), DivPrune(ratio=0.25, project=host.mm_projector)):
        host.apply(vision=method)  # by default the host's projector (Signals.projector)
        assert not any(k.startswith("vision_reducer") for k in host.state_dict())  # not copied
        vis, reduction = host.encode_images(images, {})
        assert torch.equal(reduction.index[:, 1:] - 1, picks)
        expected = feats.gather(1, picks[..., None].expand(-1, -1, vis.shape[-1]))
        torch.testing.assert_close(vis, expected)


def test_llava_host_cached_decoding_equals_recomputing_the_pruned_sequence():
    images, prefix, suffix, valid = llava_inputs()
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=DivPrune(ratio=0.25))
    assert_cached_decoding_matches(host, images, prefix, suffix, valid)


@pytest.mark.parametrize(
    "case", GOLDEN["cases"], ids=lambda c: f"m{len(c['features'])}r{c['ratio']}"
)
def test_reproduces_the_official_golden_fixture(case):
    """The official ``DivPrune`` selects the same tokens, in the same order."""
    v = tensor(case["features"])[None]  # [1, M, C]: the official code is batch-1
    assert divprune_select(v, len(case["selected"]))[0].tolist() == case["selected"]
    x = torch.cat([torch.zeros(1, 1, v.shape[-1]), v], 1)  # a CLS in front, as on the host
    out = DivPrune(ratio=case["ratio"])(x, Signals(prefix=1, size=torch.ones(1, x.shape[1], 1)))
    assert (out.index[0, 1:] - 1).tolist() == case["keep"]
    torch.testing.assert_close(out.x[0, 1:], tensor(case["out"]), atol=1e-5, rtol=1e-5)


def test_reproduces_the_official_fixture_as_one_batch():
    """Two samples of one shape: each gets the official result it gets alone."""
    case = GOLDEN["cases"][0]
    v = tensor(case["features"])
    batch = torch.stack([v.flip(0), v])  # the first sample is another image
    picks = divprune_select(batch, len(case["selected"]))
    assert picks[1].tolist() == case["selected"]
    assert picks[0].tolist() == divprune_select(v.flip(0)[None], len(case["selected"]))[0].tolist()


def test_empty_slots_of_an_earlier_step_are_left_out():
    x = tokens(seed=4)
    present = torch.ones(B, N, dtype=torch.bool)
    present[0, -5:] = False  # sample 0 was padded with 5 empty slots
    signals = make_signals(x, seed=4)
    signals.present = present
    out = DivPrune(ratio=0.5)(x, signals)
    alone = DivPrune(ratio=0.5)(x[:1, :-5], make_signals(x[:1, :-5], seed=4))
    assert torch.equal(out.index[0, : alone.num_tokens], alone.index[0])
    assert out.mask is not None and out.mask[0, alone.num_tokens :].eq(0).all()
