"""InternVL 1.5: pixel unshuffle of the InternViT grid, then the ``mlp1`` projector."""

from __future__ import annotations

import pytest
import torch

from reference.internvl_1_5 import InternVL15
from reference.projector import ProjectorSignals
from tests.reference.fixtures import load, tensor

GOLDEN = load("internvl_1_5")


def _run(case, **overrides):
    kwargs = {"downsample_ratio": case["downsample_ratio"], "ps_version": case["ps_version"]}
    method = InternVL15(case["vit"], case["llm"], **{**kwargs, **overrides})
    method.load_state_dict({k: tensor(v) for k, v in case["weights"].items()})
    with torch.no_grad():
        return method(tensor(case["x"]), ProjectorSignals(grid=tuple(case["grid"])))


@pytest.mark.parametrize(
    "case",
    GOLDEN["cases"],
    ids=lambda c: f"r{c['downsample_ratio']}-{c['ps_version']}-{c['grid'][0]}x{c['grid'][1]}",
)
def test_reproduces_the_official_extract_feature_golden_fixture(case):
    """``InternVLChatModel.extract_feature`` with the same ``mlp1`` weights: same output,
    and the official ``mlp1.*`` names load as they are."""
    torch.testing.assert_close(_run(case), tensor(case["out"]), atol=1e-5, rtol=1e-5)


def test_the_other_pixel_shuffle_version_does_not_reproduce_the_fixture():
    """v1 and v2 differ in token order only; the fixture tells them apart."""
    case = GOLDEN["cases"][0]
    other = "v2" if case["ps_version"] == "v1" else "v1"
    assert not torch.allclose(_run(case, ps_version=other), tensor(case["out"]), atol=1e-3)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """InternVL-Chat-V1-5: InternViT-6B (3200) -> InternLM2-20B (6144), ratio 0.5."""
    count = sum(p.numel() for p in InternVL15().parameters())
    assert count == GOLDEN["parameters_at_default"] == 116_429_824


def test_a_448px_tile_goes_from_1024_to_256_tokens_with_its_2x2_blocks_in_the_channels():
    method = InternVL15(4, 8, ps_version="v2")
    assert method.num_tokens(1024) == 256
    x = torch.randn(1, 1024, 4)
    out = method(x, ProjectorSignals(grid=(32, 32)))
    assert out.shape == (1, 256, 8)
    # token (0, 1) of the folded grid holds patches (0, 2), (0, 3), (1, 2), (1, 3) in order
    folded = method.mlp1[0](torch.cat([x[0, 2], x[0, 3], x[0, 34], x[0, 35]]))
    expected = method.mlp1[1:](folded)
    torch.testing.assert_close(out[0, 1], expected)


def test_ps_version_v1_leaves_the_folded_grid_transposed():
    a, b = InternVL15(4, 8, ps_version="v1"), InternVL15(4, 8, ps_version="v2")
    b.load_state_dict(a.state_dict())
    x, signals = torch.randn(1, 64, 4), ProjectorSignals(grid=(8, 8))
    v1, v2 = a(x, signals).view(4, 4, 8), b(x, signals).view(4, 4, 8)
    torch.testing.assert_close(v1, v2.transpose(0, 1))


def test_a_grid_the_ratio_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="downsample_ratio"):
        InternVL15(4, 8, downsample_ratio=0.25)(torch.randn(1, 36, 4), ProjectorSignals())
    with pytest.raises(ValueError, match=r"^downsample_ratio must be"):
        InternVL15(4, 8, downsample_ratio=0.3)
