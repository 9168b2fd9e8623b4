"""Qwen-VL: the one-layer cross-attention resampler, ``ln_post`` and ``proj``."""

from __future__ import annotations

import pytest
import torch

from reference.projector import ProjectorSignals
from reference.qwen_vl import QwenVL, sincos_pos_embed_2d
from tests.reference.fixtures import load, tensor

GOLDEN = load("qwen_vl")


def build(case) -> QwenVL:
    return QwenVL(case["in_dim"], case["out_dim"], case["n_queries"], case["num_heads"]).eval()


@pytest.mark.parametrize(
    "case",
    GOLDEN["cases"],
    ids=lambda c: f"q{c['n_queries']}-h{c['num_heads']}-n{len(c['x'][0])}-kv{c['in_dim']}",
)
def test_reproduces_the_official_golden_fixture(case):
    """``visual.py``'s ``Resampler``, ``ln_post`` and ``proj`` with the same weights: same
    output, and the official state-dict keys load as they are."""
    x = tensor(case["x"])
    method = build(case)
    method.load_state_dict({k: tensor(v) for k, v in case["weights"].items()})
    with torch.no_grad():
        out = method(x, ProjectorSignals())
    torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"q{c['n_queries']}")
def test_the_positional_table_is_the_official_one(case):
    pos = build(case).attn_pool.pos_embed
    torch.testing.assert_close(
        pos, tensor(case["weights"]["attn_pool.pos_embed"]), atol=1e-6, rtol=0
    )


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """ViT-bigG (1664) -> Qwen-7B (4096), 256 queries, 32 heads; the official module counts its
    frozen ``pos_embed`` Parameter, a buffer here."""
    method = QwenVL()
    trainable = sum(p.numel() for p in method.parameters())
    assert trainable == GOLDEN["trainable_at_default"] == 91_791_360
    assert trainable + method.attn_pool.pos_embed.numel() == GOLDEN["parameters_at_default"]
    assert GOLDEN["parameters_at_default"] == 92_839_936
    assert method.attn_pool.attn.num_heads == 32


def test_1024_patches_of_a_448px_image_become_256_tokens():
    method = QwenVL(16, 128, n_queries=256).eval()
    with torch.no_grad():
        out = method(torch.randn(1, 1024, 16), ProjectorSignals(grid=(32, 32)))
    assert out.shape == (1, 256, 128) and method.num_tokens(1024) == 256


def test_keys_take_positions_on_a_non_square_grid():
    method = QwenVL(8, 16, n_queries=4, num_heads=2).eval()
    out = method(torch.randn(2, 12, 8), ProjectorSignals(grid=(3, 4)))
    assert out.shape == (2, 4, 16)
    table = sincos_pos_embed_2d(16, 3, 4).view(3, 4, 16)
    assert torch.equal(
        table[1, 2, :4], torch.tensor([2.0, 2.0 * 0.1, 2.0 * 0.01, 2.0 * 0.001]).sin()
    )


def test_a_non_square_count_without_a_grid_is_refused():
    with pytest.raises(ValueError, match="grid"):
        QwenVL(8, 16, n_queries=4, num_heads=2)(torch.randn(1, 12, 8), ProjectorSignals())


def test_a_query_count_that_is_not_a_grid_is_refused():
    with pytest.raises(ValueError, match=r"^n_queries must be"):
        QwenVL(8, 16, n_queries=8, num_heads=2)
