"""The LLaVA-style host: cache, padding, positions after pruning, attention signals."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from reference.core import TokenReducer, identity
from reference.fastv import FastV
from reference.hosts.llava import TINY, LlavaHost, LLMReducer, LLMSignals
from reference.hosts.vit import HostState
from reference.ops import keep_image_tokens
from reference.pyramiddrop import PyramidDrop
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


class VisionSpy(TokenReducer):
    """Keeps every token; records the vision hook's input and signals."""

    catalog_id = "test_vision_spy"

    def __init__(self, needs):
        super().__init__()
        self.needs, self.seen = frozenset(needs), []

    def forward(self, x, signals):
        self.seen.append((x, signals))
        return identity(x, signals.size)


def tower_input(model: LlavaHost, images, layer: int) -> torch.Tensor:
    """The input of vision block ``layer`` (no reducer runs before the hook)."""
    vt = model.vision_tower
    x = vt.patch_embed(images)
    x = torch.cat([vt.cls_token.expand(x.shape[0], -1, -1), x], 1) + vt.pos_embed
    for block in vt.blocks[:layer]:
        x = block(x, HostState(x, 1, proportional=False))
    return x


@torch.no_grad()
def test_vision_hook_gives_logits_and_the_next_blocks_projections():
    model = host()
    spy = VisionSpy({"attn_logits", "next_q", "next_k"})
    images = inputs()[0]
    model.apply(vision=spy).encode_images(images, {})
    ((x, seen),) = spy.seen
    layer, c, heads = TINY.vision_layer, 32, 4
    block, nxt = model.vision_tower.blocks[layer], model.vision_tower.blocks[layer + 1]
    q, k, _ = block.attn.qkv(block.norm1(tower_input(model, images, layer))).chunk(3, -1)
    q, k = (t.unflatten(-1, (heads, c // heads)).transpose(1, 2) for t in (q, k))
    torch.testing.assert_close(seen.attn_logits, q @ k.transpose(-1, -2) * (c // heads) ** -0.5)
    torch.testing.assert_close(x, tower_input(model, images, layer + 1))
    w, b = nxt.attn.qkv.weight, nxt.attn.qkv.bias
    y = F.layer_norm(x, (c,), nxt.norm1.weight, nxt.norm1.bias, eps=1e-6)
    torch.testing.assert_close(seen.next_q, y @ w[:c].T + b[:c])
    torch.testing.assert_close(seen.next_k, y @ w[c : 2 * c].T + b[c : 2 * c])


@torch.no_grad()
def test_next_projections_are_absent_after_the_last_block_and_when_not_needed():
    torch.manual_seed(0)
    last = LlavaHost(replace(TINY, vision_layer=TINY.vision["depth"] - 1)).eval()
    spy = VisionSpy({"next_q", "next_k"})
    last.apply(vision=spy).encode_images(inputs()[0], {})
    assert spy.seen[0][1].next_q is None and spy.seen[0][1].next_k is None
    plain = VisionSpy(set())
    host().apply(vision=plain).encode_images(inputs()[0], {})
    seen = plain.seen[0][1]
    assert seen.next_q is None and seen.attn_logits is None and seen.attn is None


class NextSpy(Spy):
    """Keeps every token; records the signals; asks for the next layer's row only."""

    needs = frozenset({"next_attn"})

    def forward(self, h, signals):
        self.seen.append(signals)
        keep = torch.arange(signals.image_len).expand(h.shape[0], -1)
        return keep_image_tokens(h, None, signals.image_start, signals.image_len, keep)


@torch.no_grad()
def test_next_attention_is_the_next_layers_own_last_row_and_only_when_needed():
    model = host()
    first, second = NextSpy(), Spy()
    model.apply(llm={0: first, 1: second})  # neither drops a token
    model.prefill(*inputs())
    (before,), (after,) = first.seen, second.seen
    torch.testing.assert_close(before.next_attn, after.last_attn)
    assert before.last_attn is None and after.next_attn is None  # computed only when asked
    assert torch.equal(before.positions, after.positions)


@torch.no_grad()
def test_prefill_copies_the_callers_state():
    model = host().apply(llm=PyramidDrop.schedule([1, 2], lam=0.5))
    state = {"text": torch.zeros(3, 1, 8)}
    model.prefill(*inputs(), state=state)
    assert list(state) == ["text"]  # the method's scratch key stayed in the host's copy
    assert model.last_state["pyramiddrop.n_image"] == 16 and "text" in model.last_state


@torch.no_grad()
def test_an_empty_batch_gives_empty_outputs():
    images, prefix, suffix, valid = inputs()
    for llm in (None, {1: FastV(ratio=0.5)}, PyramidDrop.schedule([1, 2, 3])):
        model = host().apply(llm=llm)
        logits, cache = model.prefill(images[:0], prefix[:0], suffix[:0], valid[:0])
        assert logits.shape == (0, TINY.vocab) and cache["next_pos"].shape == (0,)
        assert model.decode(logits.argmax(-1), cache).shape == (0, TINY.vocab)
