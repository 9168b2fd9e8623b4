"""MobileVLM V2's LDPv2: MLP, 2-D average pooling to 12x12, then a depthwise-conv PEG."""

from __future__ import annotations

import pytest
import torch

from reference.mobilevlm_v2 import MobileVLMV2
from reference.projector import ProjectorSignals
from tests.reference.fixtures import load, tensor

GOLDEN = load("mobilevlm_v2")


def _run(case, method=None):
    method = method or MobileVLMV2(case["mm_hidden_size"], case["hidden_size"], shape=case["shape"])
    method.load_state_dict({k: tensor(v) for k, v in case["weights"].items()})
    with torch.no_grad():
        return method(tensor(case["x"]), ProjectorSignals(grid=(case["grid"],) * 2))


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"{c['grid']}to{c['shape']}")
def test_reproduces_the_official_ldpnetv2_golden_fixture(case):
    """``LDPNetV2Projector`` with the same weights: same output, and the official
    ``mlp.mlp.*`` / ``peg.peg.*`` names load as they are."""
    torch.testing.assert_close(_run(case), tensor(case["out"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("out_dim", "key"), [(2048, "parameters_at_default"), (2560, "parameters_3b")]
)
def test_parameter_count_at_the_paper_settings_equals_the_official_module(out_dim, key):
    """CLIP ViT-L/14-336 (1024) -> MobileLLaMA 1.4B (2048, V2 1.7B) or 2.7B (2560, V2 3B)."""
    count = sum(p.numel() for p in MobileVLMV2(1024, out_dim).parameters())
    assert count == GOLDEN[key] == {2048: 6_316_032, 2560: 9_205_760}[out_dim]


def test_576_clip_patches_become_144_tokens_as_2x2_means_plus_the_position_code():
    method = MobileVLMV2(4, 4)
    assert method.num_tokens(576) == 144
    with torch.no_grad():
        for lin in (method.mlp["mlp"][0], method.mlp["mlp"][2]):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
        method.mlp["mlp"][1] = torch.nn.Identity()
        method.peg["peg"][0].weight.zero_()
        method.peg["peg"][0].bias.fill_(0.5)
    x = torch.randn(1, 576, 4)
    out = method(x, ProjectorSignals(grid=(24, 24)))
    means = x.view(1, 12, 2, 12, 2, 4).mean(dim=(2, 4)).reshape(1, 144, 4)
    torch.testing.assert_close(out, means + 0.5)


def test_a_grid_smaller_than_the_pooled_shape_is_refused():
    with pytest.raises(ValueError, match="shape"):
        MobileVLMV2(8, 8, shape=12)(torch.randn(1, 16, 8), ProjectorSignals(grid=(4, 4)))
    with pytest.raises(ValueError, match=r"^shape must be"):
        MobileVLMV2(8, 8, shape=-1)
