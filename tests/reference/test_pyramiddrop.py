"""PyramidDrop's own invariants: top-k by the last token's attention, a pyramid schedule."""

from __future__ import annotations

import torch

from reference.llava import TINY, LlavaHost, LLMSignals
from reference.pyramiddrop import PyramidDrop
from tests.reference.test_vlm_contract import inputs

START, N_IMAGE, N_TEXT = 2, 16, 5


def test_keeps_exactly_the_top_k_by_head_mean_attention():
    g = torch.Generator().manual_seed(0)
    n = START + N_IMAGE + N_TEXT
    h = torch.randn(2, n, 8, generator=g)
    last_attn = torch.rand(2, 4, n, generator=g).softmax(-1)
    valid = torch.ones(2, n, dtype=torch.bool)
    red = PyramidDrop(retain=0.25)(h, LLMSignals(START, N_IMAGE, valid, last_attn=last_attn))
    expected = last_attn.mean(1)[:, START : START + N_IMAGE].topk(4, dim=1).indices + START
    kept = red.index[:, START : START + 4]
    assert torch.equal(kept, expected.sort(1).values)
    torch.testing.assert_close(red.x, h.gather(1, red.index[..., None].expand(-1, -1, 8)))


def test_schedule_maps_layer_list_to_hooks():
    sched = PyramidDrop.schedule([8, 16, 24], lam=0.5)
    assert sorted(sched) == [7, 15, 23]
    assert [sched[k].retain for k in (7, 15, 23)] == [0.5, 0.25, 0.125]


@torch.no_grad()
def test_pyramid_through_the_host_and_cached_decoding():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(llm=PyramidDrop.schedule([1, 2, 3], lam=0.5))
    images, prefix, suffix, valid = inputs()
    logits, cache = host.prefill(images, prefix, suffix, valid)
    trace = list(host.last_trace)
    n_image = [t.shape[1] - START - N_TEXT for t in trace]
    assert n_image == [8, 4, 2]  # 16 * 0.5^s
    token = logits.argmax(-1)
    cached = host.decode(token, cache)
    recomputed, _ = host.prefill(
        images, prefix, suffix, valid, extra_ids=token[:, None], replay=trace
    )
    torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_retain_is_relative_to_the_image_tokens_entering_the_llm():
    torch.manual_seed(0)
    llm = {0: PyramidDrop(retain=0.75), 1: PyramidDrop(retain=0.5)}
    host = LlavaHost(TINY).eval().apply(llm=llm)
    host.prefill(*inputs())
    # Relative to the 12 left after stage 1 this would be 6; the paper's ratio is of 16.
    assert [t.shape[1] - START - N_TEXT for t in host.last_trace] == [12, 8]
