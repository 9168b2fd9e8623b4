"""Honeybee's C-Abstractor: RegNet blocks around adaptive average pooling, then an MLP."""

from __future__ import annotations

import pytest
import torch

from reference.honeybee import CAbstractor, DAbstractor
from reference.projector import ProjectorSignals
from tests.reference.fixtures import load, tensor

GOLDEN = load("honeybee")
OPTIONS = ("depth", "mlp_depth", "num_query_tokens", "pos_emb", "prenorm", "num_eos_tokens")


def from_case(case: dict, **override) -> CAbstractor:
    x = tensor(case["x"])
    kwargs = {k: case[k] for k in OPTIONS} | override
    return CAbstractor(x.shape[-1], 5, num_input_tokens=x.shape[1], hidden_size=4, **kwargs)


@pytest.mark.parametrize(
    "case",
    GOLDEN["cases"],
    ids=lambda c: (
        f"d{c['depth']}-m{c['mlp_depth']}-q{c['num_query_tokens']}-e{c['num_eos_tokens']}"
    ),
)
def test_reproduces_the_official_golden_fixture(case):
    """The official ``CAbstractor`` (timm 0.9.8 blocks) with the same weights: same output,
    and its state_dict keys load as they are."""
    method = from_case(case).eval()
    method.load_state_dict({k: tensor(v) for k, v in case["weights"].items()})
    with torch.no_grad():
        out = method(tensor(case["x"]), ProjectorSignals(grid=(4, 4)))
    torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """Honeybee-C-7B-M144: 256 CLIP-L/14 patches (1024 wide) -> 144 tokens for Vicuna-7B."""
    assert sum(p.numel() for p in CAbstractor().parameters()) == GOLDEN["parameters_at_default"]
    assert GOLDEN["parameters_at_default"] == 37_070_336
    at_576 = CAbstractor(num_input_tokens=576).parameters()
    assert sum(p.numel() for p in at_576) == GOLDEN["parameters_at_576_input_tokens"]


@pytest.mark.parametrize(("n", "m"), [(256, 144), (576, 144), (576, 256), (256, 64)])
def test_any_square_output_count_from_the_paper_grids(n, m):
    method = CAbstractor(16, 8, num_input_tokens=n, num_query_tokens=m, hidden_size=16, depth=1)
    side = int(n**0.5)
    out = method(torch.randn(2, n, 16), ProjectorSignals(grid=(side, side)))
    assert out.shape == (2, m, 8) and method.num_tokens(n) == m


def test_an_older_checkpoints_cls_position_is_dropped_on_load():
    method = CAbstractor(8, 4, num_input_tokens=16, num_query_tokens=4, hidden_size=8, depth=1)
    state = method.state_dict()
    pos = torch.randn(1, 17, 8)
    method.load_state_dict(state | {"pos_emb": pos})
    torch.testing.assert_close(method.pos_emb.data, pos[:, 1:])


def test_refuses_unreachable_counts_and_wrong_inputs():
    with pytest.raises(ValueError, match="num_query_tokens must be a positive square"):
        CAbstractor(num_query_tokens=100 + 1)
    with pytest.raises(ValueError, match="num_query_tokens must be <= num_input_tokens"):
        CAbstractor(num_input_tokens=64, num_query_tokens=81)
    method = CAbstractor(8, 4, num_input_tokens=16, num_query_tokens=4, hidden_size=8, depth=1)
    with pytest.raises(ValueError, match="takes 16"):
        method(torch.randn(1, 25, 8), ProjectorSignals(grid=(5, 5)))


# -- D-Abstractor -------------------------------------------------------------------------------

D_GOLDEN = GOLDEN["d_abstractor"]
D_OPTIONS = ("decoder_layers", "num_queries", "pooled_v_target", "pos_emb", "num_eos_tokens")


def d_from_case(case: dict) -> DAbstractor:
    x = tensor(case["x"])
    kwargs = {k: case[k] for k in D_OPTIONS}
    return DAbstractor(
        x.shape[-1],
        5,
        x.shape[1],
        d_model=4,
        decoder_attention_heads=2,
        decoder_ffn_dim=6,
        **kwargs,
    )


@pytest.mark.parametrize(
    "case",
    D_GOLDEN["cases"],
    ids=lambda c: f"l{c['decoder_layers']}-q{c['num_queries']}-{c['pooled_v_target']}",
)
def test_d_abstractor_reproduces_the_official_golden_fixture(case):
    """The official ``DAbstractor`` (transformers 4.38.1's deformable decoder), same weights."""
    method = d_from_case(case).eval()
    method.load_state_dict({k: tensor(v) for k, v in case["weights"].items()})
    with torch.no_grad():
        out = method(tensor(case["x"]), ProjectorSignals(grid=(4, 4)))
    torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)


def test_d_abstractor_parameter_count_equals_the_official_module():
    """Honeybee-D-7B-M144: d-abs.yaml, 256 CLIP-L/14 patches -> 144 tokens for Vicuna-7B."""
    count = sum(p.numel() for p in DAbstractor().parameters())
    assert count == D_GOLDEN["parameters_at_default"] == 55_616_352


def test_d_abstractor_batch_gradients_and_bfloat16():
    torch.manual_seed(0)
    method = DAbstractor(**DAbstractor.test_configs["some"]).train()
    x = torch.randn(3, 16, 32, requires_grad=True)
    method(x, ProjectorSignals(grid=(4, 4))).square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in method.parameters())
    method.eval()
    with torch.no_grad():
        together = method(x, ProjectorSignals(grid=(4, 4)))
        alone = torch.cat([method(x[i : i + 1], ProjectorSignals(grid=(4, 4))) for i in range(3)])
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
        out = method.to(torch.bfloat16)(x.bfloat16(), ProjectorSignals(grid=(4, 4)))
    assert out.shape == (3, 4, 64) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize(("kwargs", "name"), DAbstractor.invalid_configs)
def test_d_abstractor_refuses_what_it_cannot_express(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        DAbstractor(**{**DAbstractor.test_configs["some"], **kwargs})
