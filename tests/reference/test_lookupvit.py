"""LookupViT's own invariants: bilinear compressed tokens that attend to the lookup grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference.lookupvit import LookupViT
from tests.reference.conftest import B, C, H, N, make_signals, tokens


def method(side: int = 2) -> LookupViT:
    torch.manual_seed(0)
    return LookupViT(side=side, dim=C, heads=H).eval()


def test_cells_partition_the_grid_and_sizes_add_up(x):
    out = method()(x, make_signals(x))
    assert out.x.shape == (B, 1 + 4, C)
    # Patch (r, c) of the 4x4 grid belongs to compressed cell (r // 2, c // 2).
    r, c = torch.arange(16) // 4, torch.arange(16) % 4
    assert (out.assign[:, 1:] == 1 + (r // 2) * 2 + c // 2).all()
    assert (out.assign[:, 0] == 0).all()
    torch.testing.assert_close(out.size[:, 1:, 0], torch.full((B, 4), 4.0))
    assert (out.index[:, 1:] == -1).all()


def test_without_gathering_compressed_tokens_are_the_bilinear_resize(x):
    m = method()
    torch.nn.init.zeros_(m.proj.weight)
    torch.nn.init.zeros_(m.proj.bias)
    out = m(x, make_signals(x))
    # Halving a grid bilinearly (half-pixel centres) averages each 2x2 block.
    blocks = x[:, 1:].reshape(B, 2, 2, 2, 2, C).mean(dim=(2, 4)).reshape(B, 4, C)
    torch.testing.assert_close(out.x[:, 1:], blocks)


def test_gathering_is_cross_attention_over_the_lookup_tokens(x):
    m = method()
    out = m(x, make_signals(x))
    lookup = x[:, 1:]
    base = lookup.reshape(B, 2, 2, 2, 2, C).mean(dim=(2, 4)).reshape(B, 4, C)
    k, v = m.kv(m.norm_lookup(lookup)).chunk(2, dim=-1)
    q = m.q(m.norm_compressed(base))
    heads = [t.reshape(B, -1, H, C // H).transpose(1, 2) for t in (q, k, v)]
    attended = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(B, 4, C)
    torch.testing.assert_close(out.x[:, 1:], base + m.proj(attended), rtol=1e-4, atol=1e-5)


def test_every_compressed_token_looks_up_the_whole_grid(x):
    m = method()
    moved = x.clone()
    moved[:, 1] += 3.0 * torch.randn(C)  # a patch in the first cell only
    before, after = m(x, make_signals(x)).x, m(moved, make_signals(moved)).x
    changed = (after - before).abs().amax(dim=-1)  # [B, 5]
    assert (changed[:, 2:] > 1e-4).all(), "cells that do not hold the patch must still see it"


def test_prefix_is_not_looked_up(x):
    m = method()
    moved = x.clone()
    moved[:, 0] += 3.0 * torch.randn(C)
    torch.testing.assert_close(
        m(moved, make_signals(moved)).x[:, 1:], m(x, make_signals(x)).x[:, 1:]
    )


def test_budget_not_below_the_token_count_is_the_identity():
    x = tokens()
    out = method(side=4)(x, make_signals(x))
    torch.testing.assert_close(out.x, x)
    assert method(side=4).budget(N, 1) == (N, N)
