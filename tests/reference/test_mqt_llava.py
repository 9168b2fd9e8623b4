"""MQT-LLaVA: a query transformer whose first ``m`` of ``M`` queries are used."""

from __future__ import annotations

import random

import pytest
import torch

from reference.mqt_llava import MQTLLaVA, matryoshka_choice, sincos_pos_embed_2d
from reference.projector import ProjectorSignals
from tests.reference.fixtures import load, tensor

GOLDEN = load("mqt_llava")


def build(case) -> MQTLLaVA:
    return MQTLLaVA(case["in_dim"], case["out_dim"], case["num_queries"], case["num_heads"]).eval()


@pytest.mark.parametrize(
    "case",
    GOLDEN["cases"],
    ids=lambda c: (
        f"m{c['num_visual_tokens']}-of{c['num_queries']}-grid{c['grid'][0]}x{c['grid'][1]}"
    ),
)
def test_reproduces_the_official_golden_fixture(case):
    """The official ``Resampler`` with the same weights and ``num_visual_tokens``: same output;
    its state-dict keys load as they are."""
    method = build(case)
    method.load_state_dict({k: tensor(v) for k, v in case["weights"].items()})
    signals = ProjectorSignals(grid=tuple(case["grid"]))
    with torch.no_grad():
        out = method(tensor(case["x"]), signals, num_visual_tokens=case["num_visual_tokens"])
    torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", GOLDEN["cases"][:1])
def test_the_positional_table_is_the_official_float16_one(case):
    official = tensor(case["weights"]["pos_embed"])  # float16 values, to 7 significant digits
    torch.testing.assert_close(build(case).pos_embed, official, atol=1e-6, rtol=0)
    exact = sincos_pos_embed_2d(case["in_dim"], 3, 3)
    assert not torch.allclose(exact, official, atol=1e-6, rtol=0)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """CLIP ViT-L/14-336 (1024) -> Vicuna-7B (4096), 256 queries, 16 heads; the official module
    counts its frozen ``pos_embed`` Parameter, a buffer here."""
    method = MQTLLaVA()
    trainable = sum(p.numel() for p in method.parameters())
    assert trainable == GOLDEN["trainable_at_default"] == 8_660_992
    assert trainable + method.pos_embed.numel() == GOLDEN["parameters_at_default"] == 8_923_136


@pytest.mark.parametrize("m", [256, 64, 16, 2])
def test_576_patches_become_the_first_m_of_256_tokens(m):
    torch.manual_seed(0)
    method = MQTLLaVA(16, 8, num_heads=2).eval()
    x = torch.randn(1, 576, 16)
    with torch.no_grad():
        full = method(x, ProjectorSignals(grid=(24, 24)))
        out = method(x, ProjectorSignals(grid=(24, 24), state={"num_visual_tokens": m}))
    assert full.shape == (1, 256, 8) and out.shape == (1, m, 8)
    # nested: each query attends alone, so m tokens are the first m of the 256
    torch.testing.assert_close(out, full[:, :m], atol=1e-6, rtol=1e-5)


def test_the_argument_overrides_the_state_which_overrides_the_default():
    method = MQTLLaVA(16, 8, num_queries=16, num_heads=2, num_visual_tokens=8).eval()
    x, grid = torch.randn(1, 16, 16), (4, 4)
    assert method(x, ProjectorSignals(grid=grid)).shape[1] == 8 == method.num_tokens(16)
    assert method(x, ProjectorSignals(grid=grid, state={"num_visual_tokens": 4})).shape[1] == 4
    signals = ProjectorSignals(grid=grid, state={"num_visual_tokens": 4})
    assert method(x, signals, num_visual_tokens=2).shape[1] == 2


def test_the_training_draw_is_an_even_count_up_to_the_query_count():
    rng = random.Random(0)
    draws = {matryoshka_choice(256, rng) for _ in range(2000)}
    assert draws == set(range(2, 258, 2))


def test_more_tokens_than_queries_is_refused():
    method = MQTLLaVA(16, 8, num_queries=16, num_heads=2)
    with pytest.raises(ValueError, match=r"^num_visual_tokens must be"):
        method(torch.randn(1, 16, 16), ProjectorSignals(grid=(4, 4)), num_visual_tokens=17)
