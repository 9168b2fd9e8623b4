"""BLIP-2: the Q-Former's query path between ``ln_vision`` and ``opt_proj``."""

from __future__ import annotations

import pytest
import torch

from reference.blip2 import Blip2, load_official
from reference.projector import ProjectorSignals
from tests.reference.fixtures import load, tensor

GOLDEN = load("blip2")


def build(case) -> Blip2:
    return Blip2(
        case["vision_width"],
        case["llm_width"],
        num_query_token=case["num_query_token"],
        cross_attention_freq=case["cross_attention_freq"],
        hidden_size=case["hidden_size"],
        num_hidden_layers=case["num_hidden_layers"],
        num_attention_heads=case["num_attention_heads"],
        intermediate_size=case["intermediate_size"],
    ).eval()


@pytest.mark.parametrize(
    "case",
    GOLDEN["cases"],
    ids=lambda c: f"freq{c['cross_attention_freq']}-l{c['num_hidden_layers']}",
)
def test_reproduces_the_official_golden_fixture(case):
    """LAVIS's Q-Former as ``Blip2OPT`` builds and runs it, same weights: same output; the CLS
    token comes from the host's last layer, as the ViT emits it."""
    x = tensor(case["x"])  # [B, 1 + N, C_v]
    method = build(case)
    method.load_state_dict({k: tensor(v) for k, v in case["weights"].items()})
    with torch.no_grad():
        out = method(x[:, 1:], ProjectorSignals(layers=(x,)))
    torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)


def test_a_lavis_state_dict_loads_dropping_the_text_parts():
    case = GOLDEN["cases"][1]
    weights = {k: tensor(v) for k, v in case["weights"].items()}
    weights["t5_proj.weight"] = weights.pop("opt_proj.weight")
    weights["t5_proj.bias"] = weights.pop("opt_proj.bias")
    weights["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    weights["Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(30522, 8)
    weights["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(16, 8)
    method = build(case)
    load_official(method, weights)
    x = tensor(case["x"])
    with torch.no_grad():
        out = method(x[:, 1:], ProjectorSignals(layers=(x,)))
    torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)
    del weights["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    with pytest.raises(RuntimeError, match="output_query"):
        load_official(method, weights)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """EVA ViT-g (1408) -> OPT-2.7b (2560), 32 queries, BERT-base with cross-attention every
    other layer (``blip2_pretrain_opt2.7b``)."""
    method = Blip2()
    count = sum(p.numel() for p in method.parameters())
    assert count == GOLDEN["parameters_at_default"] == 107_133_696
    layers = method.Qformer.bert.encoder.layer
    assert [hasattr(layer, "crossattention") for layer in layers] == [True, False] * 6


def test_257_vit_g_tokens_become_32():
    method = Blip2(16, 24, hidden_size=32, num_attention_heads=4, intermediate_size=64).eval()
    x = torch.randn(1, 257, 16)
    with torch.no_grad():
        out = method(x[:, 1:], ProjectorSignals(layers=(x,)))
    assert out.shape == (1, 32, 24) and method.num_tokens(256) == 32


def test_the_cls_token_is_attended_unless_switched_off():
    kw = {"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16, "num_query_token": 4}
    torch.manual_seed(0)
    method = Blip2(8, 8, **kw).eval()
    x = torch.randn(2, 17, 8)
    with torch.no_grad():
        with_cls = method(x[:, 1:], ProjectorSignals(layers=(x,)))
        method.with_cls = False
        without = method(x[:, 1:], ProjectorSignals(layers=(x,)))
        assert torch.equal(without, method(x[:, 1:], ProjectorSignals()))
    assert not torch.allclose(with_cls, without)


def test_heads_that_do_not_divide_the_width_are_refused():
    with pytest.raises(ValueError, match=r"^num_attention_heads must"):
        Blip2(8, 8, hidden_size=10, num_attention_heads=4)
