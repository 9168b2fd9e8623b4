"""``reference.attach`` on a transformers ``LlavaForConditionalGeneration`` (vision stage).

Tiny random LLaVA models are built from configs offline; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

import reference
from reference import registry
from reference.core import TokenReducer
from tests.reference.conftest import build

transformers = pytest.importorskip("transformers")
from reference.adapters.hf_llava import to_reference_host  # noqa: E402

ENTRIES = [e for e in registry.entries() if issubclass(e.cls, TokenReducer)]
IDS = [e.catalog_id for e in ENTRIES]
IMAGE = 110  # the image placeholder id of the tiny config
N_IMAGE = 16


def tiny_llava(attn: str = "sdpa", seed: int = 0):
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=120,
        max_position_embeddings=256,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=N_IMAGE,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration(config).eval()


def prompt(text: list[int]) -> list[int]:
    return [5, 6] + [IMAGE] * N_IMAGE + text


def batch(texts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``, as ``generate`` wants them."""
    rows = [prompt(t) for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


TEXTS = [[7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18]]
PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_the_reference_host_loads_a_transformers_llava_and_gives_its_logits(attn):
    model = tiny_llava(attn)
    host = to_reference_host(model)
    ids = torch.tensor([prompt(TEXTS[0])])
    expected = model(input_ids=ids, pixel_values=PIXELS[:1]).logits[:, -1]
    got, _ = host.prefill(PIXELS[:1], ids[:, :2], ids[:, 2 + N_IMAGE :], torch.ones(1, 5) > 0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_same_method_same_weights_same_logits_as_on_the_reference_host(entry):
    """Every token reducer at the vision hook: the transformers model and the reference
    host with its weights agree, so the host's golden-fixture fidelity carries over."""
    model = tiny_llava()
    host = to_reference_host(model)
    ids = torch.tensor([prompt(TEXTS[0])])
    with (
        reference.attach(model, build(entry.cls, "some")),
        reference.attach(host, build(entry.cls, "some")),
    ):
        got = model(input_ids=ids, pixel_values=PIXELS[:1]).logits[:, -1]
        suffix = ids[:, 2 + N_IMAGE :]
        expected, _ = host.prefill(PIXELS[:1], ids[:, :2], suffix, torch.ones_like(suffix) > 0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_a_padded_batch_gives_each_sample_what_it_gets_alone(entry):
    model = tiny_llava()
    ids, mask = batch(TEXTS)
    with reference.attach(model, build(entry.cls, "some")):
        together = model(input_ids=ids, attention_mask=mask, pixel_values=PIXELS).logits[:, -1]
        for i, text in enumerate(TEXTS):
            alone = model(input_ids=torch.tensor([prompt(text)]), pixel_values=PIXELS[i : i + 1])
            torch.testing.assert_close(together[i], alone.logits[0, -1], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_cached_generation_equals_recomputing_the_pruned_sequence():
    """Each token ``generate`` decodes with the pruned cache is the greedy choice of one
    uncached forward over the pruned prompt and the tokens before it. (transformers
    forces the cache on whenever ``inputs_embeds`` is passed, so ``use_cache=False``
    would compare the cached run with itself.)"""
    model = tiny_llava()
    ids, mask = batch(TEXTS)
    steps = 4
    with reference.attach(model, "visionzip", dominant=4, contextual=2) as handle:
        out = model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=PIXELS, max_new_tokens=steps,
            min_new_tokens=steps, do_sample=False,
        )  # fmt: skip
        shrunk = handle.patch.last_attention_mask
        width = shrunk.shape[1]
        assert shrunk.sum(1).tolist() == [2 + 6 + len(t) for t in TEXTS]
        new = out[:, width:]
        full = model(
            input_ids=torch.cat([ids, new], 1),
            attention_mask=torch.cat([mask, torch.ones_like(new)], 1),
            pixel_values=PIXELS,
        ).logits
    assert torch.equal(full[:, width - 1 : -1].argmax(-1), new)
    for i, text in enumerate(TEXTS):  # text tokens kept, in order, after 6 image tokens
        row = out[i, :width][shrunk[i] > 0].tolist()
        assert row == [5, 6] + [IMAGE] * 6 + text


@torch.no_grad()
def test_zero_budget_gives_the_plain_logits_and_detach_restores_the_model():
    model = tiny_llava()
    ids = torch.tensor([prompt(TEXTS[0])])
    plain = model(input_ids=ids, pixel_values=PIXELS[:1]).logits
    attributes = set(model.__dict__)
    with reference.attach(model, "visionzip", dominant=16, contextual=0):
        torch.testing.assert_close(model(input_ids=ids, pixel_values=PIXELS[:1]).logits, plain)
    assert set(model.__dict__) == attributes
    assert torch.equal(model(input_ids=ids, pixel_values=PIXELS[:1]).logits, plain)


@torch.no_grad()
def test_a_projector_method_replaces_the_projector():
    model = tiny_llava()
    with reference.attach(model, "deco", query_num=4) as handle:
        out = model(input_ids=torch.tensor([prompt(TEXTS[0])]), pixel_values=PIXELS[:1])
        assert out.logits.shape[1] == 2 + 4 + 5
        assert list(handle.reducers) == ["projector"]


def test_layers_are_refused_for_a_vision_stage_method():
    # Language-model methods run in the decoder: tests/reference/test_attach_transformers_llm.py
    with pytest.raises(ValueError, match="vision hook only"):
        reference.attach(tiny_llava(), "visionzip", layers=[1])
