"""The contract every method registered for the LLaVA host's language model keeps."""

from __future__ import annotations

import pytest
import torch

from reference import registry
from reference.hosts.llava import TINY, LlavaHost, LLMReducer
from tests.reference.conftest import llava_inputs

LLM_ENTRIES = [e for e in registry.entries() if issubclass(e.cls, LLMReducer)]
B = 3
N_IMAGE = 16  # TINY: 32 px images, 8 px patches
LAYER = 1


inputs = llava_inputs  # the padded batch every LLaVA-host test uses


def host_with(entry, config: str, dtype=torch.float32) -> LlavaHost:
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().to(dtype)
    method = entry.cls(**entry.cls.test_configs[config]).eval().to(dtype)
    return host.apply(llm={LAYER: method})


@pytest.fixture(params=LLM_ENTRIES, ids=[e.catalog_id for e in LLM_ENTRIES])
def entry(request):
    return request.param


@torch.no_grad()
def test_budget_and_text_tokens_kept(entry):
    host = host_with(entry, "some")
    images, prefix, suffix, valid = inputs()
    host.prefill(images, prefix, suffix, valid)
    (index,) = host.last_trace
    low, high = host.llm_reducers[str(LAYER)].image_budget(N_IMAGE)
    n_text = 2 + 5
    assert low <= index.shape[1] - n_text <= high < N_IMAGE
    assert (index[:, :2] == torch.arange(2)).all()  # prefix text in place
    assert (index[:, -5:] == torch.arange(2 + N_IMAGE, 2 + N_IMAGE + 5)).all()
    assert (index.diff(dim=1) > 0).all()  # order kept


@torch.no_grad()
def test_zero_budget_equals_the_plain_host(entry):
    images, prefix, suffix, valid = inputs()
    plain = host_with(entry, "zero").apply()
    expected, _ = plain.prefill(images, prefix, suffix, valid)
    got, _ = host_with(entry, "zero").prefill(images, prefix, suffix, valid)
    torch.testing.assert_close(got, expected)


@torch.no_grad()
def test_cached_decoding_equals_recomputing_the_pruned_sequence(entry):
    host = host_with(entry, "some")
    images, prefix, suffix, valid = inputs()
    logits, cache = host.prefill(images, prefix, suffix, valid)
    token = logits.argmax(-1)
    trace = list(host.last_trace)
    cached = host.decode(token, cache)
    recomputed, _ = host.prefill(
        images, prefix, suffix, valid, extra_ids=token[:, None], replay=trace
    )
    torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_each_sample_gets_what_it_gets_alone(entry):
    host = host_with(entry, "some")
    images, prefix, suffix, valid = inputs()
    together, _ = host.prefill(images, prefix, suffix, valid)
    for i in range(B):
        n = int(valid[i].sum())
        alone, _ = host.prefill(
            images[i : i + 1], prefix[i : i + 1], suffix[i : i + 1, :n], valid[i : i + 1, :n]
        )
        torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_bfloat16(entry):
    host = host_with(entry, "some", torch.bfloat16)
    images, prefix, suffix, valid = inputs(dtype=torch.bfloat16)
    logits, cache = host.prefill(images, prefix, suffix, valid)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert torch.isfinite(host.decode(logits.argmax(-1), cache).float()).all()
