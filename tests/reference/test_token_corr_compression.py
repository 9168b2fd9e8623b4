"""TokenCorrCompressor's own invariants: density from key correlation, IQR outliers, sampling."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import torch

from reference.hosts.llava import TINY, LlavaHost
from reference.token_corr_compression import (
    TokenCorrCompression,
    information_density,
    iqr_outliers,
    select,
)
from tests.reference.conftest import (
    B,
    N,
    assert_cached_decoding_matches,
    llava_inputs,
    make_signals,
)


def test_density_counts_patches_with_too_many_similar_partners():
    eye = torch.eye(16)
    keys = torch.cat([eye[:1].expand(8, -1), eye[1:9]])[None]  # 8 copies + 8 distinct
    # The copies have 7 partners each, the distinct patches none.
    assert information_density(keys, 0.9, limit=3).item() == 0.5
    assert information_density(keys, 0.9, limit=7).item() == 1.0
    # Against a brute-force count on random keys.
    keys = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        partners = [
            sum(
                torch.cosine_similarity(keys[i, a], keys[i, b], dim=0) > 0.5
                for b in range(16)
                if b != a
            )
            for a in range(16)
        ]
        expected = 1 - sum(p > 3 for p in partners) / 16
        assert math.isclose(information_density(keys, 0.5, 3)[i].item(), expected, abs_tol=1e-6)


def test_iqr_outliers_are_above_q3_plus_one_and_a_half_iqr():
    score = torch.rand(3, 20, generator=torch.Generator().manual_seed(0))
    score[0, 4], score[1, 7], score[1, 8] = 5.0, 3.0, 9.0
    got = iqr_outliers(score)
    for i in range(3):
        q1, _, q3 = statistics.quantiles(score[i].tolist(), n=4, method="inclusive")
        expected = [s > q3 + 1.5 * (q3 - q1) for s in score[i].tolist()]
        assert got[i].tolist() == expected
    assert got[0, 4] and got[1, 7] and got[1, 8] and got.sum() >= 3


def test_keeps_the_density_share_with_outliers_first_then_the_local_top(x):
    s = make_signals(x)
    local = torch.rand(B, N, generator=torch.Generator().manual_seed(3))
    s = replace(s, state={**s.state, "local_attn": local})
    method = TokenCorrCompression(threshold=0.3, limit=2, sample=False)
    out = method(x, s)
    density = information_density(s.keys[:, 1:], 0.3, 2)
    cls = s.cls_attn.mean(1)[:, 1:]
    outliers = iqr_outliers(cls)
    counts = set()
    for i in range(B):
        k = math.ceil(density[i].item() * 16 - 1e-4)
        assert 0 < k < 16, "the test input should remove tokens"
        forced = outliers[i].nonzero()[:, 0].tolist()
        rest = [j for j in local[i, 1:].argsort(descending=True).tolist() if j not in forced]
        expected = sorted(j + 1 for j in (forced + rest)[:k])
        kept = out.index[i][out.index[i] >= 0].tolist()
        assert kept == [0, *expected]
        counts.add(k)
    assert len(counts) > 1, "the test input should give different counts per image"
    empty = out.index == -1
    assert (out.size[..., 0][empty] == 0).all() and (out.x[empty] == 0).all()
    assert outliers.any(), "the test input should have global outliers"


def test_sampling_is_proportional_to_the_local_attention_and_keeps_outliers():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    none = torch.zeros(1, 4, dtype=torch.bool)
    hits = torch.zeros(4)
    for seed in range(2000):
        hits += select(torch.tensor([1]), none, p, sample=True, seed=seed)[0].float()
    torch.testing.assert_close(hits / 2000, p[0], atol=0.035, rtol=0)
    forced = torch.tensor([[True, False, False, False]])
    for seed in range(20):
        keep = select(torch.tensor([2]), forced, p, sample=True, seed=seed)[0]
        assert keep[0] and keep.sum() == 2
    a = select(torch.tensor([2]), none, p, sample=True, seed=0)
    assert torch.equal(a, select(torch.tensor([2]), none, p, sample=True, seed=0))


def test_max_keep_caps_the_count(x):
    s = make_signals(x)
    out = TokenCorrCompression(threshold=1.0, max_keep=0.5)(x, s)  # density 1 everywhere
    assert out.num_tokens == 1 + 8 and (out.index >= 0).all()


def test_llava_host_cached_decoding_equals_recomputing_the_pruned_sequence():
    torch.manual_seed(0)
    method = TokenCorrCompression(threshold=0.2, limit=3, max_keep=0.75)
    host = LlavaHost(TINY).eval().apply(vision=method)
    assert assert_cached_decoding_matches(host, *llava_inputs()) < 2 + 16 + 5
