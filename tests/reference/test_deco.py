"""DeCo: adaptive average pooling of the patch grid, then the MLP projector."""

from __future__ import annotations

import pytest
import torch

from reference.deco import DeCo
from reference.projector import ProjectorSignals
from tests.reference.fixtures import load, tensor

GOLDEN = load("deco")


@pytest.mark.parametrize(
    "case", GOLDEN["cases"], ids=lambda c: f"q{c['query_num']}-l{c['layer_num']}"
)
def test_reproduces_the_official_snippet_golden_fixture(case):
    """The README's ``AvgPoolProjector`` with the same weights: same output, and its
    parameter names load as they are."""
    x = tensor(case["x"])
    weights = {k: tensor(v) for k, v in case["weights"].items()}
    method = DeCo(8, 6, query_num=case["query_num"], layer_num=case["layer_num"])
    method.load_state_dict(weights)
    with torch.no_grad():
        out = method(x, ProjectorSignals())
    torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """1024 -> 4096, two layers, 144 queries (the README's defaults)."""
    count = sum(p.numel() for p in DeCo().parameters())
    assert count == GOLDEN["parameters_at_default"] == 20_979_712


def test_pools_576_patches_to_144_tokens_as_2x2_means():
    method = DeCo(4, 4, query_num=144, layer_num=1)
    method.mlp_projector[0].weight.data = torch.eye(4)
    method.mlp_projector[0].bias.data.zero_()
    x = torch.randn(1, 576, 4)
    out = method(x, ProjectorSignals(grid=(24, 24)))
    grid = x.view(1, 12, 2, 12, 2, 4).mean(dim=(2, 4)).reshape(1, 144, 4)
    torch.testing.assert_close(out, grid)


def test_a_grid_too_small_for_the_output_is_refused():
    with pytest.raises(ValueError, match="query_num"):
        DeCo(8, 8, query_num=25)(torch.randn(1, 16, 8), ProjectorSignals(grid=(4, 4)))
