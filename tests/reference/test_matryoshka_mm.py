"""M3: LLaVA's MLP projector, then nested average pooling to 1/9/36/144/576 tokens."""

from __future__ import annotations

import pytest
import torch

from reference.matryoshka_mm import SCALES, MatryoshkaMM, matryoshka_pool
from reference.projector import ProjectorSignals
from tests.reference.fixtures import load, tensor

GOLDEN = load("matryoshka_mm")
CASES = [(c, s) for c in GOLDEN["cases"] for s in c["out"]]


def _weights(case) -> dict:
    """The official ``mm_projector`` Sequential's keys, as nested in the LLaVA model."""
    return {f"mm_projector.{k}": tensor(v) for k, v in case["weights"].items()}


def _run(case, scale):
    method = MatryoshkaMM(
        case["mm_hidden_size"], case["hidden_size"], matryoshka_vis_token_scale=int(scale)
    )
    method.load_state_dict(_weights(case))
    with torch.no_grad():
        return method(tensor(case["x"]), ProjectorSignals(grid=(case["grid"],) * 2))


@pytest.mark.parametrize(
    ("case", "scale"), CASES, ids=[f"grid{c['grid']}-scale{s}" for c, s in CASES]
)
def test_reproduces_the_official_matryoshka_golden_fixture(case, scale):
    """``encode_images`` then ``matryoshka_vis_token_process`` with the same projector
    weights: same output at every scale, and the official ``mm_projector.*`` names load."""
    torch.testing.assert_close(_run(case, scale), tensor(case["out"][scale]), atol=1e-5, rtol=1e-5)


def test_pooling_before_the_projector_does_not_reproduce_the_fixture():
    """The official code pools the projected tokens; pooling CLIP features first differs."""
    case = GOLDEN["cases"][0]
    method = MatryoshkaMM(case["mm_hidden_size"], case["hidden_size"], 9)
    method.load_state_dict(_weights(case))
    with torch.no_grad():
        early = method.mm_projector(matryoshka_pool(tensor(case["x"]), (24, 24), 9))
    assert not torch.allclose(early, tensor(case["out"]["9"]), atol=1e-3)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """LLaVA-1.5-7B-M3: CLIP ViT-L/14-336 (1024) -> Vicuna-7B (4096), mlp2x_gelu."""
    count = sum(p.numel() for p in MatryoshkaMM().parameters())
    assert count == GOLDEN["parameters_at_default"] == 20_979_712


@pytest.mark.parametrize("scale", SCALES)
def test_576_patches_give_the_papers_nested_token_counts(scale):
    method = MatryoshkaMM(4, 4, matryoshka_vis_token_scale=scale, mlp_depth=1)
    method.mm_projector[0].weight.data = torch.eye(4)
    method.mm_projector[0].bias.data.zero_()
    x = torch.randn(1, 576, 4)
    out = method(x, ProjectorSignals(grid=(24, 24)))
    assert method.num_tokens(576) == scale and out.shape == (1, scale, 4)
    k = 24 // int(scale**0.5)
    means = x.view(1, 24 // k, k, 24 // k, k, 4).mean(dim=(2, 4)).reshape(1, scale, 4)
    torch.testing.assert_close(out, means)


def test_coarser_scales_are_poolings_of_finer_ones():
    x = torch.randn(2, 576, 3)
    fine = matryoshka_pool(x, (24, 24), 36)
    torch.testing.assert_close(matryoshka_pool(fine, (6, 6), 9), matryoshka_pool(x, (24, 24), 9))


def test_a_scale_the_grid_cannot_reach_is_refused():
    with pytest.raises(ValueError, match="matryoshka_vis_token_scale"):
        MatryoshkaMM(8, 8, matryoshka_vis_token_scale=25)(
            torch.randn(1, 576, 8), ProjectorSignals(grid=(24, 24))
        )
    with pytest.raises(ValueError, match=r"^matryoshka_vis_token_scale must be"):
        MatryoshkaMM(8, 8, matryoshka_vis_token_scale=50)
