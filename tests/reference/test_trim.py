"""TRIM's own invariants: IQR outliers of the CLIP text score, a mean token of the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference.core import Signals
from reference.hosts.llava import TINY, LlavaHost
from reference.trim import TRIM, iqr_outliers, text_scores
from tests.reference.conftest import (
    B,
    N,
    assert_cached_decoding_matches,
    llava_inputs,
    make_signals,
    tokens,
)
from tests.reference.fixtures import load, tensor


def expected_kept(x: torch.Tensor, text: torch.Tensor, i: int) -> list[int]:
    """The official rule on one image, in numpy: softmax(-sim), then Q3 + 1.5 IQR."""
    sim = x[i, 1:].double().numpy() @ text[i].double().mean(0).numpy()
    score = np.exp(-sim - (-sim).max())
    score /= score.sum()
    q1, q3 = np.percentile(score, 25), np.percentile(score, 75)
    return [j + 1 for j in np.where(score > q3 + 1.5 * (q3 - q1))[0].tolist()]


def test_keeps_exactly_the_iqr_outliers_in_spatial_order():
    hits = 0
    for seed in range(4):
        x = tokens(seed=seed)
        signals = make_signals(x, seed=seed)
        out = TRIM()(x, signals)
        for i in range(B):
            kept = expected_kept(x, signals.state["text"], i)
            hits += len(kept)
            assert out.index[i, 1 : 1 + len(kept)].tolist() == kept
            assert out.index[i, 1 + len(kept)] == -1  # then the aggregated token
            torch.testing.assert_close(out.x[i, 1 : 1 + len(kept)], x[i, kept])
    assert hits > 0  # the test inputs do have outliers


def test_aggregated_token_is_the_mean_of_the_patches_not_kept():
    x = tokens(seed=1)
    signals = make_signals(x, seed=1)
    out = TRIM(ratio=0.25)(x, signals)
    assert out.num_tokens == 1 + 4 + 1 and out.mask is None
    for i in range(B):
        kept = set(out.index[i, 1:5].tolist())
        dropped = [j for j in range(1, N) if j not in kept]
        torch.testing.assert_close(out.x[i, 5], x[i, dropped].mean(0))
        assert out.size[i, 5, 0] == len(dropped)
        assert (out.assign[i, dropped] == 5).all()
        assert (out.assign[i, sorted(kept)] == torch.arange(1, 5)).all()
    assert (out.index[:, 5] == -1).all()


def test_fixed_ratio_keeps_the_top_k_and_negate_flips_the_ranking():
    x = tokens(seed=2)
    signals = make_signals(x, seed=2)
    text = signals.state["text"]
    sim = x[:, 1:] @ text.mean(1).unsqueeze(-1)  # [B, M, 1]
    for negate, largest in ((True, False), (False, True)):
        out = TRIM(ratio=0.25, negate=negate)(x, signals)
        top = sim[..., 0].topk(4, dim=1, largest=largest).indices.sort(1).values + 1
        assert torch.equal(out.index[:, 1:5], top)
        # The score is a softmax of (-)similarity, so its order is the similarity's.
        score = text_scores(x[:, 1:], text, negate)
        assert torch.equal(score.topk(4, dim=1).indices.sort(1).values + 1, top)
        torch.testing.assert_close(score.sum(1), torch.ones(B))


def test_iqr_rule_flags_only_the_upper_tail():
    score = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 100, -100]])
    assert iqr_outliers(score).tolist() == [[False] * 8 + [True, False]]


def test_uneven_counts_are_padded_after_each_image_own_tokens():
    x = tokens(seed=0)
    signals = make_signals(x, seed=0)
    out = TRIM()(x, signals)
    counts = [len(expected_kept(x, signals.state["text"], i)) + 1 for i in range(B)]
    assert len(set(counts)) > 1 and out.mask is not None
    assert out.num_tokens == 1 + max(counts)
    for i in range(B):
        assert out.mask[i].sum() == 1 + counts[i]
        assert (out.mask[i, : 1 + counts[i]] == 1).all() and (
            out.mask[i, 1 + counts[i] :] == 0
        ).all()
        # A filler copies a patch that went into the aggregated token: it continues none.
        assert (out.index[i, 1 + counts[i] :] == -1).all()


def test_index_and_assign_agree_on_every_token():
    """index[j] = i implies assign[i] = j; every other patch went into the mean token."""
    checked_fillers = 0
    for seed, prefix, m, ratio in [
        (0, 1, N - 1, None),
        (1, 2, 11, None),
        (2, 0, 17, None),
        (3, 1, 9, 0.25),
        (4, 1, 9, 0.0),
        (5, 0, 1, None),
    ]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, prefix + m, 8, generator=g)
        signals = make_signals(x, prefix)
        out = TRIM(ratio=ratio)(x, signals)
        k = out.num_tokens
        for i in range(3):
            index, assign = out.index[i].tolist(), out.assign[i].tolist()
            for j, src in enumerate(index):
                if src >= 0:
                    assert assign[src] == j
            agg = [j for j in range(prefix, k) if index[j] == -1]
            real = k if out.mask is None else int(out.mask[i].sum())
            checked_fillers += k - real
            agg = [j for j in agg if j < real]  # fillers (mask 0) come after it
            assert len(agg) <= 1
            continued = {src for src in index if src >= 0}
            merged = [src for src in range(prefix + m) if src not in continued]
            assert (len(agg) == 1) == bool(merged)
            for src in merged:  # not kept: it went into the aggregated token
                assert assign[src] == agg[0]
            if merged:
                torch.testing.assert_close(out.x[i, agg[0]], x[i, merged].mean(0))
                assert out.size[i, agg[0], 0] == signals.size[i, merged, 0].sum()
    assert checked_fillers > 0


def test_without_text_the_cls_token_is_the_query():
    x = tokens(seed=3)
    signals = make_signals(x, seed=3)
    with_cls = make_signals(x, seed=3)
    with_cls.state = {"text": x[:, :1]}
    signals.state = {}
    torch.testing.assert_close(TRIM()(x, signals).x, TRIM()(x, with_cls).x)


def test_llava_host_cached_decoding_equals_recomputation():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=TRIM())
    images, prefix, suffix, valid = llava_inputs()
    g = torch.Generator().manual_seed(1)
    state = {"text": torch.randn(3, 4, TINY.vision["embed_dim"], generator=g)}
    vis, red = host.encode_images(images, dict(state))
    assert vis.shape[1] < 16 and red is not None and red.num_tokens - 1 == vis.shape[1]
    assert_cached_decoding_matches(host, images, prefix, suffix, valid, state=state)


GOLDEN = load("trim")


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["token_reduce_func"])
def test_reproduces_the_official_token_reduction_golden_fixture(case):
    """Same kept patches, in spatial order, and the same mean token as the official
    ``token_reduction`` (CLIP's post-layernorm and projection as identities)."""
    x, text = tensor(case["x"]), tensor(case["text"])
    b, n, _ = x.shape
    k = float(case["token_reduce_func"].removeprefix("TRIM:"))
    signals = Signals(prefix=0, size=torch.ones(b, n, 1), state={"text": text[:, None]})
    out = TRIM(ratio=None if k == -1 else k)(x, signals)
    index = torch.tensor(case["index"])
    width = case["actual_dims"][0]
    assert out.x.shape[1] == width
    assert torch.equal(out.index[:, : width - 1], index)
    assert (out.index[:, width - 1] == -1).all()  # the aggregated token
    torch.testing.assert_close(out.x, tensor(case["out"]), atol=1e-5, rtol=1e-5)
