"""``reference.attach``: one call on the reference hosts and on timm ViTs, fully reversible."""

from __future__ import annotations

import pytest
import torch

import reference
from reference import registry
from reference.core import TokenReducer
from reference.hosts.llava import TINY, LlavaHost
from tests.reference.conftest import build, llava_inputs, tiny_host

timm_vit = pytest.importorskip("timm.models.vision_transformer")
ENTRIES = [e for e in registry.entries() if issubclass(e.cls, TokenReducer)]
IDS = [e.catalog_id for e in ENTRIES]
TINY_TIMM = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=10)


def timm_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm_vit.VisionTransformer(**{**TINY_TIMM, "qkv_bias": True, **overrides}).eval()
    if model.cls_token is not None:
        with torch.no_grad():  # timm zero-initialises the class token: make it count
            model.cls_token.normal_()
    return model


def images(b: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "class-token": {},
    "registers-and-layer-scale": {"reg_tokens": 2, "init_values": 0.5},
    "avg-pool-no-class-token": {"class_token": False, "global_pool": "avg"},
    "clip-pre-norm": {"pre_norm": True, "no_embed_class": True},
}


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_zero_budget_gives_the_unpatched_logits_and_detach_restores_the_model(variant, fused):
    model = timm_model(**VARIANTS[variant])
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = images()
    plain = model(x)
    attributes, weights = (
        dict(model.__dict__),
        {k: v.clone() for k, v in model.state_dict().items()},
    )
    with reference.attach(model, "tome", r=0):
        assert torch.equal(model(x), plain)
    assert torch.equal(model(x), plain)
    assert model.__dict__.keys() == attributes.keys()
    assert all(model.blocks[i].__dict__.get("forward") is None for i in range(4))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_same_method_same_weights_same_logits_on_the_reference_host_and_on_timm(entry):
    """The reference host loads timm's weights; every method at two blocks gives the same
    logits on both, so what the golden fixtures prove on the host holds on timm."""
    model = timm_model()
    host = tiny_host()
    host.load_state_dict(model.state_dict())
    x = images()
    with (
        reference.attach(model, build(entry.cls, "some"), layers=[1]),
        reference.attach(host, build(entry.cls, "some"), layers=[1]),
    ):
        torch.testing.assert_close(model(x), host(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_on_timm_each_image_gets_what_it_gets_alone(entry):
    model = timm_model(init_values=0.5, global_pool="avg")
    x = images()
    with reference.attach(model, {1: build(entry.cls, "some"), 2: build(entry.cls, "some")}):
        together = model(x)
        for i in range(len(x)):
            alone = model(x[i : i + 1])[0]
            torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)


def test_paper_placement_and_keyword_arguments():
    model = timm_model()
    with reference.attach(model, "tome", r=2) as handle:  # the paper: every block
        model(images(2))
        assert sorted(handle.reducers) == [0, 1, 2, 3]
        assert handle.tokens_after() == [15, 13, 11, 9]
        assert all(r.r == 2 for r in handle.reducers.values())
    with reference.attach(model, "evit", keep_rate=0.5, layers=[2]) as handle:
        model(images(2))
        assert handle.tokens_after() == [1 + 8 + 1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: reference.attach(torch.nn.Linear(2, 2), "tome"), "not supported"),
        (lambda m: reference.attach(m, "ats"), "no paper placement"),
        (lambda m: reference.attach(m, "tome", layers=[4]), "layers must be"),
        (lambda m: reference.attach(m, "fastv"), "language model"),
        (lambda m: reference.attach(m, build(registry.entries("tome")[0].cls, "some")), "layers"),
        (lambda m: reference.attach(m, "no_such_method"), "no reference implementation"),
        (lambda m: [reference.attach(m, "tome", r=1) for _ in range(2)], "already"),
    ],
    ids=[
        "model",
        "placement",
        "layer-range",
        "wrong-family",
        "instance-layers",
        "unknown",
        "twice",
    ],
)
def test_a_call_that_cannot_work_is_refused_with_the_reason(call, message):
    with pytest.raises(ValueError, match=message):
        call(timm_model())


def test_an_unsupported_timm_model_is_refused_with_the_reason():
    model = timm_model(global_pool="map")
    with pytest.raises(ValueError, match="attention pooling"):
        reference.attach(model, "tome", r=2)


@torch.no_grad()
def test_llava_host_placements_and_exact_restore():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    inputs = llava_inputs()
    plain, _ = host.prefill(*inputs)
    with reference.attach(host, "fastv", ratio=0.0) as handle:  # the paper's K = 2
        assert list(handle.reducers) == [1]
        torch.testing.assert_close(host.prefill(*inputs)[0], plain)
    with reference.attach(host, "fastv", ratio=0.5):
        assert host.prefill(*inputs)[1]["layers"][2]["k"].shape[2] < 2 + 16 + 5
    with reference.attach(host, "visionzip", dominant=4, contextual=2) as handle:
        assert list(handle.reducers) == ["vision"]
        host.prefill(*inputs)
        assert host.last_trace == []  # nothing in the language model
    with reference.attach(host, "deco", query_num=4) as handle:
        _, cache = host.prefill(*inputs)
        assert cache["layers"][0]["k"].shape[2] == 2 + 4 + 5
    assert host.vision_reducer is None and host.projector is None and not host.llm_by_layer
    torch.testing.assert_close(host.prefill(*inputs)[0], plain)
