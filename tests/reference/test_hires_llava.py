"""HiRes-LLaVA (provisional): the Self-Mining Sampler and LLaVA's MLP projector."""

from __future__ import annotations

import pytest
import torch

from reference.hires_llava import HiResLLaVA
from reference.projector import ProjectorSignals


def test_is_marked_provisional():
    assert HiResLLaVA.basis.startswith("provisional")


def test_a_576_token_slice_becomes_144_tokens():
    method = HiResLLaVA(16, 32, num_heads=2).eval()
    with torch.no_grad():
        out = method(torch.randn(2, 576, 16), ProjectorSignals(grid=(24, 24)))
    assert out.shape == (2, 144, 32) and method.num_tokens(576) == 144


def test_the_queries_are_the_pooled_tokens_of_their_own_region():
    method = HiResLLaVA(4, 4, num_queries=4, num_heads=1).eval()
    with torch.no_grad():  # sampler residuals off, projector the identity
        for linear in (method.sampler.attn.out_proj, method.sampler.ffn[2]):
            linear.weight.zero_()
            linear.bias.zero_()
        method.mm_projector = torch.nn.Identity()
        x = torch.randn(1, 16, 4)
        out = method(x, ProjectorSignals(grid=(4, 4)))
    cells = x.view(1, 2, 2, 2, 2, 4).mean(dim=(2, 4)).reshape(1, 4, 4)
    torch.testing.assert_close(out, cells)


def test_the_sampler_mines_detail_from_the_whole_slice():
    torch.manual_seed(0)
    method = HiResLLaVA(8, 8, num_queries=4, num_heads=2).eval()
    x = torch.randn(1, 16, 8)
    moved = x.clone()
    moved[0, 0] = torch.randn(8)  # a token of the first query's region only
    with torch.no_grad():
        a, b = (method(t, ProjectorSignals(grid=(4, 4))) for t in (x, moved))
    assert not torch.allclose(a[0, 3], b[0, 3])  # the last query attends to it too


def test_a_query_grid_larger_than_the_patch_grid_is_refused():
    with pytest.raises(ValueError, match=r"^num_queries must"):
        HiResLLaVA(8, 8, num_queries=25, num_heads=2)(
            torch.randn(1, 16, 8), ProjectorSignals(grid=(4, 4))
        )
