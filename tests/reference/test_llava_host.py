"""The LLaVA-style host: cache, padding, positions after pruning, attention signals."""

from __future__ import annotations

import torch

from reference.fastv import FastV
from reference.llava import TINY, LlavaHost, LLMReducer, LLMSignals
from reference.tome import ToMe
from tests.reference.test_vlm_contract import inputs


def host() -> LlavaHost:
    torch.manual_seed(0)
    return LlavaHost(TINY).eval()


@torch.no_grad()
def test_two_cached_decoding_steps_equal_recomputation():
    model = host()
    images, prefix, suffix, valid = inputs()
    logits, cache = model.prefill(images, prefix, suffix, valid)
    first = logits.argmax(-1)
    second = model.decode(first, cache).argmax(-1)
    third = model.decode(second, cache)
    extra = torch.stack([first, second], 1)
    recomputed, _ = model.prefill(images, prefix, suffix, valid, extra_ids=extra)
    torch.testing.assert_close(third, recomputed, rtol=1e-4, atol=1e-5)


class Spy(LLMReducer):
    """Keeps every token; records the signals."""

    catalog_id = "test_spy"
    needs = frozenset({"last_attn", "attn"})

    def __init__(self):
        super().__init__()
        self.seen: list[LLMSignals] = []

    def forward(self, h, signals):
        self.seen.append(signals)
        return FastV(ratio=0.0)(h, signals)


@torch.no_grad()
def test_last_attention_row_is_the_last_valid_tokens_row_of_the_full_map():
    model = host()
    spy = Spy()
    model.apply(llm={0: spy})
    images, prefix, suffix, valid = inputs()
    model.prefill(images, prefix, suffix, valid)
    (seen,) = spy.seen
    last = seen.valid.long().cumsum(1).argmax(1)
    expected = seen.attn[torch.arange(3), :, last]  # [B, H, N]
    torch.testing.assert_close(seen.last_attn, expected)
    # Padding keys get no attention.
    assert (seen.last_attn[~seen.valid[:, None, :].expand_as(seen.last_attn)] == 0).all()
    assert seen.image_start == 2 and seen.image_len == 16


@torch.no_grad()
def test_pruned_tokens_keep_their_positions_and_decoding_continues_after_the_prompt():
    model = host().apply(llm={1: FastV(ratio=0.75)})
    images, prefix, suffix, valid = inputs()
    _, cache = model.prefill(images, prefix, suffix, valid)
    (index,) = model.last_trace
    assert index.shape[1] == 2 + 4 + 5
    # The next position is the prompt's full length, not the pruned one.
    assert cache["next_pos"].tolist() == (2 + 16 + valid.sum(1)).tolist()


@torch.no_grad()
def test_a_vision_stage_reducer_shortens_the_language_models_input():
    model = host().apply(vision=ToMe(r=6))
    images, prefix, suffix, valid = inputs()
    logits, cache = model.prefill(images, prefix, suffix, valid)
    assert cache["layers"][0]["valid"].shape[1] == 2 + (16 - 6) + 5
    token = logits.argmax(-1)
    cached = model.decode(token, cache)
    recomputed, _ = model.prefill(images, prefix, suffix, valid, extra_ids=token[:, None])
    torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)
