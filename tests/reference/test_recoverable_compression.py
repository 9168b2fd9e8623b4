"""Recoverable Compression's own invariants: LOF counts, text recovery, centre/extra tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference.core import Signals
from reference.hosts.llava import TINY, LlavaHost
from reference.recoverable_compression import RecoverableCompression, lof_outliers
from tests.reference.conftest import (
    B,
    N,
    assert_cached_decoding_matches,
    llava_inputs,
    make_signals,
    tokens,
)
from tests.reference.fixtures import load, tensor


def naive_lof(values: list[float], k: int) -> list[bool]:
    """sklearn's LocalOutlierFactor on 1-D data, written from its definition."""
    n = len(values)
    k = max(1, min(k, n - 1))
    nbrs, kdist = [], []
    for i in range(n):
        d = sorted((abs(values[i] - values[j]), j) for j in range(n) if j != i)[:k]
        nbrs.append([j for _, j in d])
        kdist.append(d[-1][0])
    lrd = []
    for i in range(n):
        reach = [max(abs(values[i] - values[j]), kdist[j]) for j in nbrs[i]]
        lrd.append(1 / (sum(reach) / k + 1e-10))
    return [sum(lrd[j] for j in nbrs[i]) / k / lrd[i] > 1.5 for i in range(n)]


def test_lof_matches_the_definition_on_full_and_masked_sets():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(2, 30, generator=g), 8 * torch.rand(2, 4, generator=g)], 1)
    valid = torch.rand(2, 34, generator=g) > 0.3
    flagged = 0
    for k in (3, 10, 20):
        full = lof_outliers(values, torch.ones_like(valid), k)
        part = lof_outliers(values, valid, k)
        for i in range(2):
            assert full[i].tolist() == naive_lof(values[i].tolist(), k)
            idx = valid[i].nonzero()[:, 0]
            assert part[i, idx].tolist() == naive_lof(values[i, idx].tolist(), k)
            assert not part[i, ~valid[i]].any()
            flagged += int(full[i].sum())
    assert flagged > 0


def test_fixed_visual_filter_keeps_the_top_cls_attention_tokens_unchanged():
    x = tokens(seed=1)
    signals = make_signals(x, seed=1)
    out = RecoverableCompression(vision_ratio=0.25)(x, signals)
    attn = signals.cls_attn.mean(1)[:, 1:]  # [B, M]
    for i in range(B):
        top = set((attn[i].topk(4).indices + 1).tolist())
        rows = [r for r in range(out.num_tokens) if int(out.index[i, r]) in top]
        assert len(rows) == 4
        torch.testing.assert_close(out.x[i, rows], x[i, sorted(top)])
        assert out.index[i, rows].tolist() == sorted(top)  # spatial order


def test_centres_absorb_their_neighbours_and_the_extra_token_sums_the_rest():
    checked = 0
    for seed in range(4):
        x = tokens(seed=seed)
        signals = make_signals(x, seed=seed)
        method = RecoverableCompression(neighbors=3)
        out = method(x, signals)
        attn = signals.cls_attn.mean(1)[:, 1:]
        text = F.normalize(signals.state["text"].mean(1), dim=-1)
        sim = (F.normalize(x[:, 1:], dim=-1) @ text.unsqueeze(-1))[..., 0] * x.shape[-1] ** -0.5
        keys = F.normalize(signals.keys[:, 1:], dim=-1)
        for i in range(B):
            real = int(out.mask[i].sum()) if out.mask is not None else out.num_tokens
            index = out.index[i, :real].tolist()
            if index[-1] != -1:
                continue
            # Tokens assigned to the extra slot are the rest minus the centres.
            others = [j for j in range(1, N) if out.assign[i, j] == real - 1]
            rest = set(others)
            centres = []
            for r in range(real - 2, 0, -1):
                j = index[r]
                tok = out.x[i, r]
                if torch.allclose(tok, x[i, j]):
                    break
                centres.append((r, j))
            rest |= {j for _, j in centres}
            expected_extra = sum(attn[i, j - 1] * x[i, j] for j in others)
            torch.testing.assert_close(out.x[i, real - 1], expected_extra)
            assert out.size[i, real - 1, 0] == len(others)
            for r, j in centres:
                cand = [q for q in rest if q != j]
                aff = {q: float(keys[i, j - 1] @ keys[i, q - 1] + 50 * sim[i, q - 1]) for q in cand}
                members = sorted(cand, key=lambda q: -aff[q])[:3]
                expected = x[i, j] + sum(attn[i, q - 1] * x[i, q] for q in members)
                torch.testing.assert_close(out.x[i, r], expected)
                checked += 1
            # Centres are the most attended tokens of the rest, in descending order.
            c_attn = [float(attn[i, j - 1]) for _, j in reversed(centres)]
            assert c_attn == sorted(c_attn, reverse=True)
            assert all(a >= float(attn[i, q - 1]) for a in c_attn for q in others)
    assert checked > 0


def test_text_recovery_picks_the_most_text_similar_tokens_of_the_rest():
    # 64 patches: LOF with 20 neighbours needs more points than the 16 of the tiny input.
    x = torch.randn(B, 1 + 64, 32, generator=torch.Generator().manual_seed(2))
    signals = make_signals(x, seed=2)
    # Token 7 looks like the question: a text-score outlier the visual filter missed.
    x[:, 7] = 5 * signals.state["text"].mean(1)
    out = RecoverableCompression(vision_ratio=0.0)(x, signals)
    text = F.normalize(signals.state["text"].mean(1), dim=-1)
    sim = (F.normalize(x[:, 1:], dim=-1) @ text.unsqueeze(-1))[..., 0]  # [B, M]
    n_t = lof_outliers(sim, torch.ones_like(sim, dtype=torch.bool), 20).sum(1)
    for i in range(B):
        k = int(n_t[i])
        top = (sim[i].topk(k).indices + 1).sort().values
        assert 7 in top.tolist()
        assert torch.equal(out.index[i, 1 : 1 + k], top)  # recovered first, spatial order
        torch.testing.assert_close(out.x[i, 1 : 1 + k], x[i, top])


def test_output_is_always_shorter_and_full_visual_filter_is_identity():
    for seed in range(6):
        x = tokens(seed=seed)
        signals = make_signals(x, seed=seed)
        assert RecoverableCompression()(x, signals).num_tokens < N
        assert RecoverableCompression(vision_ratio=0.9)(x, signals).num_tokens < N
    out = RecoverableCompression(vision_ratio=1.0)(x, signals)
    assert out.num_tokens == N and out.mask is None


def test_llava_host_cached_decoding_equals_recomputation():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=RecoverableCompression())
    images, prefix, suffix, valid = llava_inputs()
    g = torch.Generator().manual_seed(1)
    state = {"text": torch.randn(3, 4, TINY.vision["embed_dim"], generator=g)}
    vis, red = host.encode_images(images, dict(state))
    assert vis.shape[1] < 16 and red is not None and red.num_tokens - 1 == vis.shape[1]
    assert_cached_decoding_matches(host, images, prefix, suffix, valid, state=state)


GOLDEN = load("recoverable_compression")


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["name"])
def test_reproduces_the_official_text_guided_recovery_golden_fixture(case):
    """Same recovered tokens (spatial order), centres (by CLS attention), extra token and
    values as the official ``token_recycling_with_text_in_vision_and_clustring`` (batch 1).
    Its two documented indexing bugs are kept out of reach (fixture ``produced``): the width
    C equals the remaining-token count (or there is no outlier), and ``k`` holds the keys
    the official code actually read for each token."""
    x = tensor(case["x"])
    b, n, _ = x.shape
    signals = Signals(
        prefix=1,
        size=torch.ones(b, n, 1),
        cls_attn=tensor(case["cls_attn"])[:, None],  # [1, 1, N], the official one-head row
        keys=tensor(case["k"]),  # the keys the official code used for each token
        state={"text": tensor(case["text"])[:, None]},  # [1, 1, C]
    )
    red = RecoverableCompression()(x, signals)
    assert red.index[0, 1:].tolist() == case["index"]  # the CLS (prefix) is ours, not official
    n_main = case["n_vision"] + case["n_text"]
    assert red.num_tokens == 1 + n_main + case["n_centres"] + (case["n_centres"] > 0)
    torch.testing.assert_close(red.x[:, 1:], tensor(case["out"]), atol=1e-5, rtol=1e-5)
