"""FastVLM: FastViTHD's downsampling sets the token count; the official tower reproduced."""

from __future__ import annotations

import pytest
import torch

from reference.fastvlm import FastViTHD, FastVLM, official_keys, token_grid
from reference.projector import ProjectorSignals
from tests.reference.fixtures import load, tensor

GOLDEN = load("fastvlm")
CFG = GOLDEN["config"]
TINY = {"layers": CFG["layers"], "embed_dims": CFG["embed_dims"], "mlp_ratios": CFG["mlp_ratios"]}


def weights(keys: list) -> dict[str, torch.Tensor]:
    """The fixture's weight recipe (see its ``produced``), checked against the stored sums."""
    out = {}
    for i, (name, shape, total) in enumerate(keys):
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(0)
            continue
        w = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.3
        out[name] = w.abs() + 0.5 if name.endswith("running_var") else w
        assert float(out[name].double().sum()) == pytest.approx(total, rel=1e-9, abs=1e-9), name
    return out


def image(case) -> torch.Tensor:
    x = torch.randn(
        case["image_shape"], generator=torch.Generator().manual_seed(case["image_seed"])
    )
    assert float(x.sum()) == pytest.approx(case["image_sum"], rel=1e-9)
    return x


CASES = pytest.mark.parametrize(
    "case", GOLDEN["cases"], ids=lambda c: "x".join(map(str, c["image_shape"]))
)


@CASES
@torch.no_grad()
def test_fastvithd_reproduces_the_official_tower(case):
    """Official ``FastViT`` (``fastvithd()`` layout, tiny widths) + MCi head: same map and
    embedding, and its state_dict loads strictly under the official names."""
    tower = FastViTHD(**TINY, projection_dim=CFG["projection_dim"]).eval()
    tower.load_state_dict(weights(GOLDEN["tower_keys"]))
    emb = tower(image(case))
    assert list(emb.shape[2:]) == case["grid"]
    feats = emb.flatten(2).transpose(1, 2)
    torch.testing.assert_close(feats, tensor(case["image_features"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tower.embed(emb), tensor(case["pooled"]), atol=1e-5, rtol=1e-5)


@CASES
@torch.no_grad()
def test_fastvlm_reproduces_the_official_tower_and_projector_from_a_checkpoint(case):
    """A LLaVA-style checkpoint (official key prefixes) loads through ``official_keys``; the
    image, fed pixel by pixel, comes out as the official projected tokens."""
    checkpoint = {
        **{
            f"model.vision_tower.vision_tower.model.{k}": v
            for k, v in weights(GOLDEN["tower_keys"]).items()
        },
        **{f"model.mm_projector.{k}": v for k, v in weights(GOLDEN["projector_keys"]).items()},
    }
    method = FastVLM(3, CFG["hidden"], **TINY).eval()
    method.load_state_dict(official_keys(checkpoint))
    x = image(case)
    h, w = x.shape[2:]
    out = method(x.flatten(2).transpose(1, 2), ProjectorSignals(grid=(h, w)))
    torch.testing.assert_close(out, tensor(case["projected"]), atol=1e-5, rtol=1e-5)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """FastViTHD with the MCi head (mobileclip_l_1024: 3072 -> 768) as the official tower;
    FastVLM-0.5B drops that unused head and adds the 3072 -> 896 two-layer MLP."""
    with torch.device("meta"):
        tower, method = FastViTHD(), FastVLM()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(tower) == GOLDEN["parameters_at_default"] == 125_073_504
    head = GOLDEN["parameters_at_default"] - GOLDEN["parameters_at_default_without_head"]
    assert count(tower.head) == head == 3072 * 768
    projector = GOLDEN["mm_projector_parameters_at_default"]
    assert count(method) == GOLDEN["parameters_at_default_without_head"] + projector


@torch.no_grad()
def test_a_1024_px_image_gives_256_tokens():
    """Stride 64: 1024 px -> 16 x 16 tokens (tiny widths, the official five-stage layout)."""
    torch.manual_seed(0)
    method = FastVLM(3, 8, embed_dims=(4, 8, 8, 32, 32), layers=(1,) * 5).eval()
    pixels = torch.rand(1, 1024 * 1024, 3)
    out = method(pixels, ProjectorSignals(grid=(1024, 1024)))
    assert out.shape == (1, 256, 8) and method.num_tokens(1024 * 1024) == 256
    assert token_grid(768, 768) == (12, 12) and token_grid(1024, 1024, num_stages=4) == (32, 32)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match=r"^layers must be"):
        FastViTHD(layers=(2, 2, 2, 2, 2, 2))
    with pytest.raises(ValueError, match=r"^embed_dims must be multiples of 32"):
        FastViTHD(embed_dims=(8, 16, 16, 16, 48))
    with pytest.raises(ValueError, match="not a square image"):
        FastVLM(**FastVLM.test_configs["some"])(torch.randn(1, 12, 32), ProjectorSignals())
