"""mPLUG-DocOwl2: the H-Reducer and the High-resolution DocCompressor."""

from __future__ import annotations

import pytest
import torch

from reference.docowl2 import DocOwl2, crop_windows
from reference.projector import ProjectorSignals
from tests.reference.fixtures import load, tensor

GOLDEN = load("docowl2")


def build() -> DocOwl2:
    cfg = GOLDEN["config"]
    method = DocOwl2(
        cfg["in_dim"],
        cfg["out_dim"],
        layer=cfg["layer"],
        high_reso_cross_num_att_heads=cfg["high_reso_cross_num_att_heads"],
    ).eval()
    scale = GOLDEN["weights_scale"]
    method.load_state_dict({k: tensor(v) * scale for k, v in GOLDEN["weights"].items()})
    return method


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"{c['grid']}-{c['crop_grid']}")
def test_reproduces_the_official_golden_fixture(case):
    """``MplugDocOwlHReducerModel`` then ``MplugDocOwlHRDocCompressor`` with the same weights
    (the official keys, less ``model.``): the same ``N / 4 + 1`` tokens per image, for every
    crop grid."""
    method, grid = build(), tuple(case["grid"])
    outs = []
    with torch.no_grad():
        for glob, crops, crop_grid in zip(
            case["global"], case["crops"], case["crop_grid"], strict=True
        ):
            outs.append(method.compress(tensor(glob)[None], tensor(crops)[None], crop_grid, grid))
    torch.testing.assert_close(torch.cat(outs), tensor(case["out"]), atol=1e-5, rtol=1e-5)
    if case["crop_grid"] == [[1, 1]]:  # forward: the one view is its own 1x1 crop
        x = tensor(case["global"][0])[None]
        with torch.no_grad():
            out = method(x, ProjectorSignals(grid=grid))
        torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """ViT-L/14 at 504 px (1024) -> LLM 4096, 1x4 H-Reducer, 2 layers of 16 heads; the official
    count includes ``ln_q`` and ``vit_eos``, buffers here (they never reach the output)."""
    with torch.device("meta"):
        method = DocOwl2()
    trained = sum(p.numel() for p in method.parameters())
    frozen = sum(b.numel() for b in method.buffers())
    assert frozen == 2 * 1024 + 4096
    assert trained + frozen == GOLDEN["parameters_at_default"] == 446_895_104
    assert sum(p.numel() for p in method.hr_compressor.parameters()) == 421_713_920
    assert method.hr_compressor.compressor_crossatt.layers[0].output.mlp.w1.out_features == 11008


def test_a_504px_page_becomes_324_plus_one_tokens():
    method = DocOwl2(8, 16, layer=1, high_reso_cross_num_att_heads=2).eval()
    glob, crops = torch.randn(1, 1296, 8), torch.randn(1, 6, 1296, 8)
    with torch.no_grad():
        out = method.compress(glob, crops, (2, 3), (36, 36))
    assert out.shape == (1, 325, 16) and method.num_tokens(1296) == 325


def test_each_global_token_sees_its_own_region_of_the_crops():
    # crop (r, c), token (y, x) of a 2x3 grid of 2x2-token crops; the map is 4x6
    crops = torch.tensor(
        [[[[r, c, y, x] for y in range(2) for x in range(2)] for r in range(2) for c in range(3)]]
    ).float()
    windows = crop_windows(crops, (2, 3), (2, 2))  # [1, 4, 6, 4]
    rows = windows[0, :, :, 0] * 2 + windows[0, :, :, 2]  # map row = r * h + y
    cols = windows[0, :, :, 1] * 2 + windows[0, :, :, 3]
    assert rows[1].tolist() == [0, 0, 0, 1, 1, 1] and cols[1].tolist() == [3, 4, 5, 3, 4, 5]
    assert rows[2].tolist() == [2, 2, 2, 3, 3, 3] and cols[2].tolist() == [0, 1, 2, 0, 1, 2]


def test_a_grid_the_reducer_cannot_divide_is_refused():
    method = DocOwl2(8, 16, layer=1, high_reso_cross_num_att_heads=2)
    with pytest.raises(ValueError, match=r"^conv_shape must"):
        method(torch.randn(1, 18, 8), ProjectorSignals(grid=(3, 6)))
    with pytest.raises(ValueError, match=r"^conv_shape must"):
        DocOwl2(8, 16, conv_shape="2x2")
