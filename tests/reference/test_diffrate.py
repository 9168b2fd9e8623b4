"""DiffRate's own invariants: rank-based prune then merge, the DDP's straight-through counts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from reference.core import Signals
from reference.diffrate import DiffRate, expected_kept, keep_probability, search_flops
from tests.reference.conftest import B, N, make_signals
from tests.reference.fixtures import load, tensor

GOLDEN = load("diffrate")


def ranks(signals):
    order = signals.cls_attn[:, :, 1:].mean(1).argsort(dim=1, descending=True)
    return order.argsort(dim=1)  # [B, 16], 0 = most attended


def test_inference_prunes_by_rank_and_merges_into_most_similar(x):
    signals = make_signals(x)
    out = DiffRate(patch_number=16, prune_kept=12, merge_kept=8).eval()(x, signals)
    rank = ranks(signals)
    assert out.num_tokens == 1 + 8
    for i in range(B):
        dst = (rank[i] < 8).nonzero()[:, 0] + 1  # image tokens, spatial order
        assert torch.equal(out.index[i, 1:], dst)
        unit = F.normalize(x[i], dim=-1)
        for j in range(1, N):
            r = int(rank[i, j - 1])
            if r >= 12:  # pruned
                assert out.assign[i, j] == -1
            elif r >= 8:  # merged into the most cosine-similar destination
                best = dst[(unit[dst] @ unit[j]).argmax()]
                assert out.index[i, out.assign[i, j]] == best
        for slot in range(1, out.num_tokens):
            members = (out.assign[i] == slot).nonzero()[:, 0]
            torch.testing.assert_close(out.x[i, slot], x[i, members].mean(0))  # plain mean
            assert out.size[i, slot, 0] == len(members)


def test_ddp_count_is_the_ceiled_expectation_with_a_gradient():
    candidates = torch.arange(16, 0, -1).float()
    logits = torch.zeros(16, requires_grad=True)
    count = expected_kept(logits, candidates)
    assert count.item() == 9  # ceil(8.5)
    count.backward()
    p = torch.full((16,), 1 / 16)
    torch.testing.assert_close(logits.grad, p * (candidates - 8.5))  # d E / d logits
    assert torch.equal(keep_probability(logits, candidates, 3), 1 - torch.arange(3) / 16)


def test_search_mask_is_hard_and_matches_inference(x):
    method = DiffRate(patch_number=16, prune_kept=12, merge_kept=8)
    signals = make_signals(x)
    train = method.train()(x, signals)
    rank = ranks(signals)
    assert train.x.shape == x.shape
    torch.testing.assert_close(train.mask[:, 1:].detach(), (rank < 8).float())
    assert len(signals.state["diffrate_kept"]) == 1
    train.mask.sum().backward()
    assert method.prune_logits.grad.abs().sum() > 0 and method.merge_logits.grad.abs().sum() > 0
    # The surviving tokens are the inference output, token for token.
    test = method.eval()(x, make_signals(x))
    for i in range(B):
        torch.testing.assert_close(train.x[i, test.index[i]].detach(), test.x[i])
        torch.testing.assert_close(train.size[i, test.index[i]], test.size[i])


def test_masked_tokens_stay_masked_in_later_blocks(x):
    signals = make_signals(x)
    first = DiffRate(patch_number=16, prune_kept=10, merge_kept=10).train()(x, signals)
    later = DiffRate(patch_number=16, prune_kept=14, merge_kept=6).train()
    carried = replace(make_signals(first.x.detach(), seed=1), state=signals.state)
    out = later(first.x.detach(), carried)
    m1, m2 = first.mask[:, 1:].detach(), out.mask[:, 1:].detach()
    assert ((m1 == 0) <= (m2 == 0)).all()
    assert (m2.sum(1) == 6).all()  # 10 live tokens, pruning to 14 is a no-op, merge to 6


def test_learned_counts_and_flops():
    method = DiffRate(patch_number=16).eval()
    assert method.kept_counts() == (9, 9) and method.budget(N, 1) == (10, 10)
    full = [(torch.tensor(16.0), torch.tensor(16.0))] * 2
    n, c = 17.0, 8
    per_block = 4 * n * c * c + 2 * n * n * c + 8 * n * c * c
    assert search_flops(full, 17, c).item() == 2 * per_block
    prune = expected_kept(method.prune_logits, method.candidates)
    merge = expected_kept(method.merge_logits, method.candidates)
    search_flops([(prune, merge)] * 2, 17, c).backward()
    assert method.prune_logits.grad.abs().sum() > 0 and method.merge_logits.grad.abs().sum() > 0


def test_paper_setting_picks_the_host_models_searched_schedule():
    # compression_rate.json at 91ae3e3: ViT-T-DeiT 0.8, ViT-S-DeiT 2.9, ViT-B-DeiT 11.5
    # (counts include CLS); ours count image tokens.
    last_blocks = {192: (92, 80, 74, 84, 78, 70), 384: (99, 78, 58, 88, 64, 56)}
    last_blocks[768] = (107, 72, 43, 94, 50, 35)
    seen = set()
    for dim, counts in last_blocks.items():
        setting, proportional = DiffRate.paper_setting(12, dim)
        assert proportional and sorted(setting) == list(range(12))
        kept = [(setting[i]["prune_kept"] + 1, setting[i]["merge_kept"] + 1) for i in (8, 9, 10)]
        assert tuple(p for p, _ in kept) + tuple(q for _, q in kept) == counts
        assert setting[11] == {"prune_kept": 2, "merge_kept": 2, "similarity_size": True}
        seen.add(tuple(sorted((k, tuple(v.items())) for k, v in setting.items())))
    assert len(seen) == 3  # one schedule per model, not DeiT-B's for all
    assert DiffRate.paper_setting(24, 1024)[0][23]["merge_kept"] == 31
    assert DiffRate.paper_setting(12, 16) == ({}, False)


@pytest.mark.parametrize(
    "case", GOLDEN["cases"], ids=lambda c: f"prune{c['prune_kept']}-merge{c['merge_kept']}"
)
def test_reproduces_the_official_block_golden_fixture(case):
    """The official ``DiffRateBlock`` (eval) prunes and merges the same tokens, same values."""
    x, cls_attn = tensor(case["x"]), tensor(case["cls_attn"])
    official, official_size = tensor(case["out"]), tensor(case["out_size"])
    source = torch.tensor(case["source"])  # [B, N_out, N]: inputs each official output absorbed
    b, n, _ = x.shape
    signals = Signals(prefix=1, size=tensor(case["size"])[..., None], cls_attn=cls_attn)
    method = DiffRate(n - 1, case["prune_kept"], case["merge_kept"], similarity_size=True).eval()
    out = method(x, signals)
    assert out.num_tokens == official.shape[1]
    for i in range(b):
        rows = {frozenset(source[i, j].nonzero()[:, 0].tolist()): j for j in range(source.shape[1])}
        for slot in range(out.num_tokens):
            members = frozenset((out.assign[i] == slot).nonzero()[:, 0].tolist())
            assert members in rows, f"sample {i}: our token {slot} absorbed {sorted(members)}"
            j = rows[members]
            torch.testing.assert_close(out.x[i, slot], official[i, j], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                out.size[i, slot, 0], official_size[i, j], atol=1e-5, rtol=1e-5
            )
