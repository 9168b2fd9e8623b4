"""LVP (provisional, from the abstract): text-guided selection, then deformable attention."""

from __future__ import annotations

import pytest
import torch

from reference.lvp import LVP, deformable_sample
from reference.projector import ProjectorSignals


def test_is_marked_provisional():
    assert LVP.basis.startswith("provisional")


def test_576_patches_become_144_tokens():
    method = LVP(16, 32, num_heads=2).eval()
    signals = ProjectorSignals(grid=(24, 24), state={"text": torch.randn(2, 7, 16)})
    with torch.no_grad():
        out = method(torch.randn(2, 576, 16), signals)
    assert out.shape == (2, 144, 32) and method.num_tokens(576) == 144
    kept = signals.state["lvp"]["kept"]
    assert kept.shape == (2, 144) and bool((kept.diff(dim=1) > 0).all())  # raster order


def test_keeps_the_tokens_most_similar_to_the_text():
    torch.manual_seed(0)
    method = LVP(8, 8, num_queries=3, num_heads=2, n_points=1).eval()
    with torch.no_grad():  # no enhancement, identity text map: selection on the raw features
        method.enhancer.cross_attn.out_proj.weight.zero_()
        method.enhancer.cross_attn.out_proj.bias.zero_()
        method.enhancer.ffn[2].weight.zero_()
        method.enhancer.ffn[2].bias.zero_()
        method.text_proj.weight.copy_(torch.eye(8))
        method.text_proj.bias.zero_()
    x = torch.randn(1, 16, 8)
    signals = ProjectorSignals(grid=(4, 4), state={"text": x[:, [13, 2, 7]] * 3})
    with torch.no_grad():
        method(x, signals)
    assert signals.state["lvp"]["kept"].tolist() == [[2, 7, 13]]


def test_a_sample_at_a_cell_centre_is_that_cells_value():
    value = torch.randn(1, 12, 1, 5)  # one head on a 3x4 grid
    cell = torch.tensor([[2, 1], [0, 0], [3, 2]])  # (x, y)
    loc = ((cell + 0.5) / torch.tensor([4, 3])).view(1, 3, 1, 1, 1, 2)
    out = deformable_sample([value], [(3, 4)], loc, torch.ones(1, 3, 1, 1, 1))
    index = cell[:, 1] * 4 + cell[:, 0]
    torch.testing.assert_close(out[0], value[0, index, 0])


def test_the_multi_level_projector_reads_the_named_vision_layers():
    method = LVP(8, 16, num_queries=4, levels=(0, -1), num_heads=2, n_points=2).eval()
    layers = [torch.randn(1, 17, 8) for _ in range(3)]
    text = {"text": torch.randn(1, 3, 8)}
    with torch.no_grad():
        out = method(layers[-1][:, 1:], ProjectorSignals(tuple(layers), (4, 4), dict(text)))
        layers[0] = layers[0] + 1
        moved = method(layers[-1][:, 1:], ProjectorSignals(tuple(layers), (4, 4), dict(text)))
        layers[1] = layers[1] + 1  # not a named level
        same = method(layers[-1][:, 1:], ProjectorSignals(tuple(layers), (4, 4), dict(text)))
    assert out.shape == (1, 4, 16) and not torch.allclose(out, moved)
    torch.testing.assert_close(same, moved)


def test_more_queries_than_patches_is_refused():
    with pytest.raises(ValueError, match=r"^num_queries must be"):
        LVP(8, 8, num_queries=20, num_heads=2)(torch.randn(1, 16, 8), ProjectorSignals(grid=(4, 4)))
