"""VoCo-LLaMA: VoCo tokens after the image; later text attends them, not the image."""

from __future__ import annotations

import pytest
import torch

import reference
from reference.hosts.llava import TINY, LlavaConfig, LlavaHost
from reference.projector import Projector
from reference.voco_llama import VocoLlama, voco_attention
from tests.reference.conftest import assert_cached_decoding_matches, llava_inputs
from tests.reference.fixtures import load, tensor

FIXTURE = load("voco_llama")


class Fixed(Projector):
    """Stands in for the vision tower and projector: gives the fixture's image embeddings."""

    def __init__(self, tokens):
        super().__init__()
        self.register_buffer("out", tokens)

    def forward(self, features, signals):
        return self.out

    def num_tokens(self, n):
        return self.out.shape[1]


def official_host(case: dict, voco: VocoLlama, **host_kwargs):
    """A host with the fixture's decoder weights whose prompt is the case's embeddings (text
    rows in the word table, image rows from ``Fixed``); the ``lm_head`` is the identity, so
    the logits are the normed last hidden state."""
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
    own = host.state_dict()
    for name, value in FIXTURE["weights"].items():
        key = name.replace("self_attn.", "").replace("mlp.", "")
        own[key] = tensor(value).view(FIXTURE["shapes"][name])
    own["lm_head.weight"] = torch.eye(c["hidden"])
    embeds = tensor(case["inputs_embeds"]).view(case["shape"])  # [B, N, C]
    b, p, i, m = embeds.shape[0], case["prefix"], case["image"], case["voco"]
    text = torch.cat([embeds[:, :p], embeds[:, p + i + m :]], 1).flatten(0, 1)  # [B * L, C]
    table = torch.zeros(c["hidden"], c["hidden"])
    table[: len(text)] = text
    own["embed_tokens.weight"] = table
    host.load_state_dict(own)
    with torch.no_grad():
        voco.voco_embedding.copy_(embeds[0, p + i : p + i + 1])
    host.apply(projector=Fixed(embeds[:, p : p + i]), sequence=voco, **host_kwargs)
    ids = torch.arange(len(text)).view(b, -1)
    return host, torch.zeros(b, 3, 32, 32), ids[:, :p], ids[:, p:]


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: f"{c['image']}img-{c['voco']}voco")
@torch.no_grad()
def test_reproduces_the_official_prefill_golden_fixture(case):
    host, images, prefix, suffix = official_host(case, VocoLlama(8, case["voco"]))
    n, first = case["shape"][1], case["prefix"] + case["image"]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    expected = tensor(case["allowed"], torch.bool)  # [B, N, N]
    assert torch.equal(
        (voco_attention(n, first, case["voco"]) & causal).expand_as(expected), expected
    )
    logits, _ = host.prefill(images, prefix, suffix, torch.ones_like(suffix, dtype=torch.bool))
    torch.testing.assert_close(
        logits, tensor(case["last_hidden"]).view_as(logits), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("change", ["no mask", "fewer voco", "voco before the image"])
@torch.no_grad()
def test_the_fixture_test_fails_when_an_option_is_perturbed(change):
    case = FIXTURE["cases"][0]
    voco = VocoLlama(8, case["voco"] - 1 if change == "fewer voco" else case["voco"])
    if change == "no mask":
        voco.attention = lambda layout: None
    if change == "voco before the image":
        voco.attention = lambda layout: voco_attention(
            layout.valid.shape[1], layout.image_start, layout.inserted
        ).expand(layout.valid.shape[0], -1, -1)
    host, images, prefix, suffix = official_host(case, voco)
    logits, _ = host.prefill(images, prefix, suffix, torch.ones_like(suffix, dtype=torch.bool))
    assert not torch.allclose(logits, tensor(case["last_hidden"]).view_as(logits), atol=1e-3)


def test_parameter_count_at_the_paper_setting_equals_the_official():
    assert sum(p.numel() for p in VocoLlama().parameters()) == FIXTURE["parameters_at_default"]
    assert FIXTURE["parameters_at_default"] == 4096  # one <voco> row of Vicuna-7B's table


def tiny(voco_num: int = 2, dtype=torch.float32) -> LlavaHost:
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    return host.apply(sequence=VocoLlama(TINY.hidden, voco_num)).to(dtype)


@torch.no_grad()
def test_after_the_prefill_every_layer_caches_only_the_voco_tokens_and_the_text():
    images, prefix, suffix, valid = llava_inputs()
    for m in (1, 2):
        _, cache = tiny(m).prefill(images, prefix, suffix, valid)
        for layer in cache["layers"]:
            assert layer["k"].shape[2] == m + 5  # 2 prefix and 16 image keys gone
            assert torch.equal(layer["valid"], torch.cat([torch.ones(3, m).bool(), valid], 1))
        assert cache["next_pos"].tolist() == (2 + 16 + m + valid.sum(1)).tolist()


@torch.no_grad()
def test_text_after_the_voco_tokens_attends_them_and_not_the_image():
    from tests.reference.test_llava_host import Spy

    images, prefix, suffix, valid = llava_inputs()
    host, spy = tiny(), Spy()
    host.apply(llm={0: spy}, sequence=host.sequence)
    host.prefill(images, prefix, suffix, valid)
    attn = spy.seen[0].attn  # [B, H, N, N]: prefix 2, image 16, VoCo 2, text 5
    assert (attn[:, :, 20:, :18] == 0).all() and (attn[:, :, 20:, 18:20] > 0).all()
    assert (attn[:, :, 18:20, 2:18] > 0).all()  # the VoCo tokens see the image


@torch.no_grad()
def test_cached_decoding_equals_recomputing_without_a_cache():
    images, prefix, suffix, valid = llava_inputs()
    host = tiny()
    assert assert_cached_decoding_matches(host, images, prefix, suffix, valid) == 2 + 5
    logits, cache = host.prefill(images, prefix, suffix, valid)
    first = logits.argmax(-1)
    second = host.decode(first, cache).argmax(-1)
    third = host.decode(second, cache)
    extra = torch.stack([first, second], 1)
    recomputed, _ = host.prefill(images, prefix, suffix, valid, extra_ids=extra)
    torch.testing.assert_close(third, recomputed, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_each_sample_gets_what_it_gets_alone():
    images, prefix, suffix, valid = llava_inputs()
    host = tiny()
    together, _ = host.prefill(images, prefix, suffix, valid)
    for i in range(3):
        n = int(valid[i].sum())
        alone, _ = host.prefill(
            images[i : i + 1], prefix[i : i + 1], suffix[i : i + 1, :n], valid[i : i + 1, :n]
        )
        torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)


def test_gradients_reach_the_voco_embedding():
    images, prefix, suffix, valid = llava_inputs()
    host = tiny()
    logits, _ = host.prefill(images, prefix, suffix, valid)
    logits.sum().backward()
    assert host.sequence.voco_embedding.grad.abs().sum() > 0


@torch.no_grad()
def test_bfloat16():
    images, prefix, suffix, valid = llava_inputs(dtype=torch.bfloat16)
    host = tiny(dtype=torch.bfloat16)
    logits, cache = host.prefill(images, prefix, suffix, valid)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert torch.isfinite(host.decode(logits.argmax(-1), cache).float()).all()


def test_settings_the_paper_cannot_express_are_refused():
    with pytest.raises(ValueError, match=r"^voco_num must be"):
        VocoLlama(64, 0)


@torch.no_grad()
def test_attach_puts_it_on_the_llava_host_and_detach_restores_it():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    images, prefix, suffix, valid = llava_inputs()
    plain, _ = host.prefill(images, prefix, suffix, valid)
    with reference.attach(host, "voco_llama", voco_num=1) as handle:
        assert host.sequence is handle.reducers["sequence"] and host.sequence.voco_num == 1
        _, cache = host.prefill(images, prefix, suffix, valid)
        assert cache["layers"][0]["k"].shape[2] == 1 + 5
    assert host.sequence is None
    torch.testing.assert_close(host.prefill(images, prefix, suffix, valid)[0], plain)


def test_a_transformers_llava_refuses_it():
    pytest.importorskip("transformers")
    from tests.reference.test_attach_transformers import tiny_llava

    with pytest.raises(ValueError, match="attach"):
        reference.attach(tiny_llava(), "voco_llama")
