"""p-MoD: routed decoder layers for image tokens, progressive ratio decay, TanhNorm, STRing."""

from __future__ import annotations

import pytest
import torch

import reference
from reference.hosts.llava import TINY, LlavaConfig, LlavaHost
from reference.p_mod import PMoD, load_official, prd_schedule
from tests.reference.conftest import assert_cached_decoding_matches, llava_inputs
from tests.reference.fixtures import load, tensor
from tests.reference.test_voco_llama import Fixed

FIXTURE = load("p_mod")
RATIOS = {int(k): v for k, v in FIXTURE["ratios"].items()}


def official_host(case: dict, method: PMoD):
    """A host with the fixture's weights whose prompt is the case's embeddings (text rows in
    the word table, image rows from ``Fixed``; row 0 is the decoded token); the ``lm_head`` is
    the identity, so the logits are the normed last hidden state."""
    c = FIXTURE["config"]
    cfg = LlavaConfig(
        vision=TINY.vision,
        vision_layer=TINY.vision_layer,
        hidden=c["hidden"],
        layers=c["layers"],
        heads=c["heads"],
        kv_heads=c["kv_heads"],
        intermediate=c["intermediate"],
        vocab=c["hidden"],
    )
    torch.manual_seed(0)
    host = LlavaHost(cfg).eval()
    own, routers = host.state_dict(), {}
    for name, value in FIXTURE["weights"].items():
        value = tensor(value).view(FIXTURE["shapes"][name])
        if ".router." in name:
            routers[name] = value
            continue
        for part in ("decoder_layer.", "self_attn.", "mlp."):
            name = name.replace(part, "")
        own[name] = value
    load_official(method, routers)
    own["lm_head.weight"] = torch.eye(c["hidden"])
    embeds = tensor(case["inputs_embeds"]).view(case["shape"])  # [1, N, C]
    p, i = case["prefix"], case["image"]
    text = torch.cat([tensor(case["decode_embeds"]).view(1, 8), embeds[0, :p], embeds[0, p + i :]])
    table = torch.zeros(c["hidden"], c["hidden"])
    table[: len(text)] = text
    own["embed_tokens.weight"] = table
    host.load_state_dict(own)
    host.apply(projector=Fixed(embeds[:, p : p + i]), sequence=method)
    ids = torch.arange(1, len(text))[None]
    return host, torch.zeros(1, 3, 32, 32), ids[:, :p], ids[:, p:]


def fixture_method(**kwargs) -> PMoD:
    return PMoD(8, 4, **{"ratios": RATIOS, "special_init": False, **kwargs})


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: f"{c['image']}img")
@torch.no_grad()
def test_reproduces_the_official_golden_fixture_prefill_cache_and_decoding(case):
    host, images, prefix, suffix = official_host(case, fixture_method())
    logits, cache = host.prefill(images, prefix, suffix, torch.ones_like(suffix, dtype=torch.bool))
    torch.testing.assert_close(logits[0], tensor(case["last_hidden"]), rtol=1e-5, atol=1e-5)
    assert [layer["k"].shape[2] for layer in cache["layers"]] == case["cache_lengths"]
    step = host.decode(torch.zeros(1, dtype=torch.long), cache)
    torch.testing.assert_close(step[0], tensor(case["decode_hidden"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change",
    [{"ratios": {2: 0.5, 3: 0.5}}, {"ratios": {2: 0.3, 3: 0.3}}, {"weight_norm": "none"}],
)
@torch.no_grad()
def test_the_fixture_test_fails_when_an_option_is_perturbed(change):
    case = FIXTURE["cases"][0]
    host, images, prefix, suffix = official_host(case, fixture_method(**change))
    logits, _ = host.prefill(images, prefix, suffix, torch.ones_like(suffix, dtype=torch.bool))
    assert not torch.allclose(logits[0], tensor(case["last_hidden"]), atol=1e-3)


def test_the_schedule_and_parameter_count_at_the_paper_setting_equal_the_official():
    expected = {int(k): v for k, v in FIXTURE["schedule"].items()}
    assert prd_schedule(32) == pytest.approx(expected) and list(expected) == list(range(8, 32))
    method = PMoD()
    assert method.ratios == pytest.approx(expected)
    assert sum(p.numel() for p in method.parameters()) == FIXTURE["parameters_at_default"]
    assert FIXTURE["parameters_at_default"] == 24 * 4097


def tiny(dtype=torch.float32, **kwargs) -> LlavaHost:
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    method = PMoD.for_host(TINY, **{**PMoD.test_configs["some"], **kwargs})
    return host.apply(sequence=method.eval()).to(dtype)


@torch.no_grad()
def test_each_mod_layer_caches_the_text_and_its_top_ratio_of_the_image():
    host = tiny()
    assert host.sequence.ratios == pytest.approx({1: 0.75, 2: 0.25, 3: 0.15})
    images, prefix, suffix, valid = llava_inputs()
    _, cache = host.prefill(images, prefix, suffix, valid)
    keys = [layer["k"].shape[2] for layer in cache["layers"]]
    assert keys == [2 + 16 + 5, 2 + 12 + 5, 2 + 4 + 5, 2 + 2 + 5]
    assert cache["next_pos"].tolist() == (2 + 16 + valid.sum(1)).tolist()


@torch.no_grad()
def test_zero_routers_keep_every_token_unweighted_at_ratio_one():
    """Ratio 1 and weight 1 everywhere (zero routers, TanhNorm): the plain host's output."""
    images, prefix, suffix, valid = llava_inputs()
    torch.manual_seed(0)
    plain = LlavaHost(TINY).eval()
    expected, _ = plain.prefill(images, prefix, suffix, valid)
    routed = plain.apply(sequence=PMoD(64, 4, ratios={1: 1.0, 2: 1.0}))
    torch.testing.assert_close(routed.prefill(images, prefix, suffix, valid)[0], expected)


@torch.no_grad()
def test_cached_decoding_equals_recomputing_without_a_cache():
    host = tiny()
    images, prefix, suffix, valid = llava_inputs()
    assert assert_cached_decoding_matches(host, images, prefix, suffix, valid) == 2 + 16 + 5
    logits, cache = host.prefill(images, prefix, suffix, valid)
    first = logits.argmax(-1)
    second = host.decode(first, cache).argmax(-1)
    third = host.decode(second, cache)
    extra = torch.stack([first, second], 1)
    recomputed, _ = host.prefill(images, prefix, suffix, valid, extra_ids=extra)
    torch.testing.assert_close(third, recomputed, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_each_sample_gets_what_it_gets_alone():
    host = tiny()
    images, prefix, suffix, valid = llava_inputs()
    together, _ = host.prefill(images, prefix, suffix, valid)
    for i in range(3):
        n = int(valid[i].sum())
        alone, _ = host.prefill(
            images[i : i + 1], prefix[i : i + 1], suffix[i : i + 1, :n], valid[i : i + 1, :n]
        )
        torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)


def test_gradients_reach_the_routers():
    """All but the last layer's: the last token's logits never read that layer's image
    outputs (the training loss reads text tokens only, too)."""
    host = tiny()
    logits, _ = host.prefill(*llava_inputs())
    logits.sum().backward()
    routers = host.sequence.routers
    for layer in ("1", "2"):
        assert routers[layer].router.weight.grad.abs().sum() > 0
    assert routers["3"].router.weight.grad.abs().sum() == 0


@torch.no_grad()
def test_bfloat16():
    host = tiny(torch.bfloat16)
    images, prefix, suffix, valid = llava_inputs(dtype=torch.bfloat16)
    logits, cache = host.prefill(images, prefix, suffix, valid)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert torch.isfinite(host.decode(logits.argmax(-1), cache).float()).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_ratio": 1.5}, "max_ratio"),
        ({"min_ratio": 0.9}, "min_ratio"),
        ({"decay": "step"}, "decay"),
        ({"weight_norm": "relu"}, "weight_norm"),
        ({"ratios": {40: 0.5}}, "ratios"),
        ({"num_layers": 1}, "num_layers"),
    ],
)
def test_settings_the_paper_cannot_express_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        PMoD(64, **{"num_layers": 4, **kwargs})


def test_an_llm_reducer_cannot_act_at_a_routed_layer():
    from reference.fastv import FastV

    host = tiny()
    host.apply(llm={1: FastV(ratio=0.5)}, sequence=host.sequence)
    with pytest.raises(ValueError, match="routed"):
        host.prefill(*llava_inputs())


@torch.no_grad()
def test_attach_puts_it_on_the_llava_host_and_a_transformers_llava_refuses_it():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    with reference.attach(host, "p_mod", special_init=False) as handle:
        assert host.sequence is handle.reducers["sequence"]
        assert sorted(host.sequence.ratios) == [1, 2, 3]
    assert host.sequence is None
    pytest.importorskip("transformers")
    from tests.reference.test_attach_transformers import tiny_llava

    with pytest.raises(ValueError, match="attach"):
        reference.attach(tiny_llava(), "p_mod")
