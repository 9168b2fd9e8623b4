"""Victor (provisional): registers after the image; image tokens gone after the first layers."""

from __future__ import annotations

import pytest
import torch

import reference
from reference.hosts.llava import TINY, LlavaHost, LLMReducer
from reference.ops import keep_image_tokens
from reference.victor import Victor
from tests.reference.conftest import assert_cached_decoding_matches, llava_inputs


class DropImage(LLMReducer):
    """Drops every image token (the existing LLM-stage mechanism)."""

    catalog_id = "test_drop_image"
    needs = frozenset()

    def forward(self, h, signals):
        none = torch.zeros(h.shape[0], 0, dtype=torch.long)
        return keep_image_tokens(h, None, signals.image_start, signals.image_len, none)


def tiny(dtype=torch.float32, **kwargs) -> LlavaHost:
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    method = Victor.for_host(TINY, **{**Victor.test_configs["some"], **kwargs})
    return host.apply(sequence=method).to(dtype)


@torch.no_grad()
def test_the_later_layers_cache_the_prefix_registers_and_text_only():
    host = tiny()
    images, prefix, suffix, valid = llava_inputs()
    _, cache = host.prefill(images, prefix, suffix, valid)
    assert [layer["k"].shape[2] for layer in cache["layers"]] == [2 + 16 + 2 + 5] * 2 + [
        2 + 2 + 5
    ] * 2
    assert cache["next_pos"].tolist() == (2 + 16 + 2 + valid.sum(1)).tolist()


@torch.no_grad()
def test_it_equals_dropping_the_image_tokens_with_an_llm_reducer():
    host = tiny()
    images, prefix, suffix, valid = llava_inputs()
    expected, _ = host.prefill(images, prefix, suffix, valid)
    registers_only = Victor(64, 2, summary_layers=99)  # never routes
    registers_only.load_state_dict(host.sequence.state_dict())
    host.apply(sequence=registers_only, llm={1: DropImage()})
    got, _ = host.prefill(images, prefix, suffix, valid)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_parameter_count_is_the_registers():
    assert sum(p.numel() for p in Victor().parameters()) == 8 * 4096


@torch.no_grad()
def test_cached_decoding_equals_recomputing_without_a_cache():
    host = tiny()
    images, prefix, suffix, valid = llava_inputs()
    assert assert_cached_decoding_matches(host, images, prefix, suffix, valid) == 2 + 16 + 2 + 5
    logits, cache = host.prefill(images, prefix, suffix, valid)
    first = logits.argmax(-1)
    second = host.decode(first, cache).argmax(-1)
    third = host.decode(second, cache)
    recomputed, _ = host.prefill(
        images, prefix, suffix, valid, extra_ids=torch.stack([first, second], 1)
    )
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


def test_gradients_reach_the_registers():
    host = tiny()
    logits, _ = host.prefill(*llava_inputs())
    logits.sum().backward()
    assert host.sequence.registers.grad.abs().sum() > 0


@torch.no_grad()
def test_bfloat16():
    host = tiny(torch.bfloat16)
    images, prefix, suffix, valid = llava_inputs(dtype=torch.bfloat16)
    logits, cache = host.prefill(images, prefix, suffix, valid)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert torch.isfinite(host.decode(logits.argmax(-1), cache).float()).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"num_registers": 0}, "num_registers"), ({"summary_layers": 0}, "summary_layers")],
)
def test_settings_the_paper_cannot_express_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        Victor(64, **kwargs)
    with pytest.raises(ValueError, match=r"^summary_layers must be"):
        Victor.for_host(TINY, summary_layers=4)


@torch.no_grad()
def test_attach_puts_it_on_the_llava_host_and_a_transformers_llava_refuses_it():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    with reference.attach(host, "victor", num_registers=2, summary_layers=1) as handle:
        assert host.sequence is handle.reducers["sequence"]
    assert host.sequence is None
    pytest.importorskip("transformers")
    from tests.reference.test_attach_transformers import tiny_llava

    with pytest.raises(ValueError, match="attach"):
        reference.attach(tiny_llava(), "victor")
