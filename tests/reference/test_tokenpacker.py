"""TokenPacker: downsampled point queries attend to their own region of multi-level features."""

from __future__ import annotations

import pytest
import torch

from reference.projector import ProjectorSignals
from reference.tokenpacker import TokenPacker
from tests.reference.fixtures import load, tensor

GOLDEN = load("tokenpacker")


def from_case(case: dict) -> TokenPacker:
    c_v = len(case["layers"][0][0][0])
    return TokenPacker(
        c_v,
        5,
        raw_grid=case["raw_grid"],
        scale_factor=case["scale_factor"],
        embed_dim=8,
        num_heads=2,
        multi_layers=tuple(case["multi_layers"]),
    )


@pytest.mark.parametrize(
    "case",
    GOLDEN["cases"],
    ids=lambda c: f"g{c['raw_grid']}-s{c['scale_factor']}-l{'.'.join(map(str, c['multi_layers']))}",
)
def test_reproduces_the_official_golden_fixture(case):
    """The official ``TokenPacker`` with the same weights: same output, and its state_dict
    keys load as they are; its levels are hidden_states[l] = signals.layers[l - 1]."""
    method = from_case(case).eval()
    method.load_state_dict({k: tensor(v) for k, v in case["weights"].items()})
    layers = tuple(tensor(t) for t in case["layers"])
    grid = (case["raw_grid"],) * 2
    with torch.no_grad():
        out = method(layers[-1][:, 1:], ProjectorSignals(layers=layers, grid=grid))
    torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """LLaVA-1.5-7B: CLIP-L/14 at 336 px (1024 wide, four levels) -> Vicuna-7B (4096)."""
    count = sum(p.numel() for p in TokenPacker().parameters())
    assert count == GOLDEN["parameters_at_default"] == 36_722_688


@pytest.mark.parametrize(("scale", "m"), [(2, 144), (3, 64), (4, 36)])
def test_packs_576_patches_to_the_papers_counts(scale, m):
    """Scale factors 2, 3, 4: 144, 64, 36 tokens (75% to 94% fewer)."""
    method = TokenPacker(16, 8, scale_factor=scale, embed_dim=16, num_heads=2)
    layers = tuple(torch.randn(1, 577, 16) for _ in range(23))  # hidden_states 1..23
    out = method(layers[-1][:, 1:], ProjectorSignals(layers=layers, grid=(24, 24)))
    assert out.shape == (1, m, 8) and method.num_tokens(576) == m


def test_each_query_sees_only_its_own_region():
    """Changing the levels in one 2x2 region changes that region's token alone."""
    torch.manual_seed(0)
    method = TokenPacker(8, 8, raw_grid=4, embed_dim=8, num_heads=2, multi_layers=(1, 2)).eval()
    for p in method.parameters():
        p.data.normal_()  # weights of order one, so a change shows
    layers = tuple(torch.randn(1, 17, 8) for _ in range(2))
    x = torch.randn(1, 16, 8)
    before = method(x, ProjectorSignals(layers=layers))
    changed = tuple(t.clone() for t in layers)
    for t in changed:
        t[:, 1 + 2 * 4 + 2] = torch.randn(8)  # patch (2, 2): the bottom-right region, token 3
    after = method(x, ProjectorSignals(layers=changed))
    moved = (after - before).abs().amax(-1)[0]
    assert moved[3] > 1e-3 and torch.all(moved[:3] == 0)


def test_refuses_unreachable_settings_and_missing_levels():
    with pytest.raises(ValueError, match="scale_factor must be >= 2 and divide raw_grid"):
        TokenPacker(scale_factor=5)
    method = TokenPacker(8, 8, raw_grid=4, embed_dim=8, num_heads=2, multi_layers=(1, 3))
    layers = tuple(torch.randn(1, 17, 8) for _ in range(2))
    with pytest.raises(ValueError, match="multi_layers"):
        method(layers[-1][:, 1:], ProjectorSignals(layers=layers))
    with pytest.raises(ValueError, match="takes 4"):
        method(torch.randn(1, 25, 8), ProjectorSignals(layers=layers))
