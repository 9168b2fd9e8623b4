"""Vote&Mix's own invariants: the most-voted tokens go, and their mass is mixed, not lost."""

from __future__ import annotations

import torch

from reference.vote_and_mix import VoteAndMix, vote_and_mix
from tests.reference.conftest import N, make_signals, tokens


def _votes_by_hand(keys: torch.Tensor, votes: int) -> torch.Tensor:
    """Vote totals of one sample ``keys [M, D]`` with a loop over the voters."""
    k = torch.nn.functional.normalize(keys, dim=-1)
    sim = k @ k.t()
    totals = torch.zeros(len(k))
    for i in range(len(k)):
        others = [j for j in range(len(k)) if j != i]
        best = sorted(others, key=lambda j: -sim[i, j].item())[:votes]
        for j in best:
            totals[j] += sim[i, j]
    return totals


def _sized_case(seed: int = 0):
    x = tokens(seed=seed)
    signals = make_signals(x, seed=seed)
    signals.size = torch.randint(
        1, 5, signals.size.shape, generator=torch.Generator().manual_seed(seed)
    ).float()
    return x, signals


def test_the_most_voted_tokens_are_the_ones_mixed_away():
    x, signals = _sized_case()
    for votes in (1, 3):
        out = vote_and_mix(x, signals.size, signals.keys, 1, 5, votes=votes)
        for i in range(x.shape[0]):
            totals = _votes_by_hand(signals.keys[i, 1:], votes)
            kept = [j - 1 for j in out.index[i, 1:].tolist()]
            gone = [j for j in range(N - 1) if j not in kept]
            assert len(gone) == 5 and totals[gone].min() >= totals[kept].max()
            assert totals[gone].sum() > totals[kept].sum() / 3  # not all ties at zero


def test_mixing_conserves_size_and_mass():
    x, signals = _sized_case(seed=3)
    out = VoteAndMix(ratio=0.5)(x, signals)
    assert out.x.shape[1] == 1 + 8
    torch.testing.assert_close(out.size.sum(1), signals.size.sum(1))
    torch.testing.assert_close((out.x * out.size).sum(1), (x * signals.size).sum(1))
    torch.testing.assert_close(out.x[:, 0], x[:, 0])


def test_retained_tokens_are_size_weighted_soft_mixtures():
    x, signals = _sized_case(seed=1)
    tau = 0.3
    out = vote_and_mix(x, signals.size, signals.keys, 1, 6, tau=tau)
    for i in range(x.shape[0]):
        k = torch.nn.functional.normalize(signals.keys[i], dim=-1)
        kept = out.index[i, 1:].tolist()
        gone = [j for j in range(1, N) if j not in kept]
        w = ((k[gone] @ k[kept].t()) / tau).softmax(dim=-1)  # [s, K]
        s = signals.size[i]
        for slot, j in enumerate(kept, start=1):
            size = s[j] + sum(w[a, slot - 1] * s[g] for a, g in enumerate(gone))
            mass = x[i, j] * s[j] + sum(w[a, slot - 1] * s[g] * x[i, g] for a, g in enumerate(gone))
            torch.testing.assert_close(out.size[i, slot], size)
            torch.testing.assert_close(out.x[i, slot], mass / size)
        for a, g in enumerate(gone):  # a mixed token points where most of it went
            assert out.assign[i, g] == 1 + w[a].argmax()


def test_small_temperature_is_a_hard_merge_into_the_nearest_retained_token():
    x, signals = _sized_case(seed=2)
    soft = vote_and_mix(x, signals.size, signals.keys, 1, 4, tau=1e-4)
    expected = torch.zeros_like(soft.x)
    sizes = torch.zeros_like(soft.size)
    for i in range(x.shape[0]):
        for j in range(N):
            expected[i, soft.assign[i, j]] += x[i, j] * signals.size[i, j]
            sizes[i, soft.assign[i, j]] += signals.size[i, j]
    torch.testing.assert_close(soft.size, sizes)
    torch.testing.assert_close(soft.x, expected / sizes)
