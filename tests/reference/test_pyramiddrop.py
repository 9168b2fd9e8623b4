"""PyramidDrop against its official rank-and-drop step, and its own invariants: top-k by
the next layer's attention of the last token, a pyramid schedule, renumbered positions."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from reference.hosts.llava import TINY, DecoderLayer, LlavaHost, LLMReducer, LLMSignals
from reference.ops import keep_image_tokens
from reference.pyramiddrop import PyramidDrop
from tests.reference.fixtures import load, tensor
from tests.reference.test_vlm_contract import inputs

START, N_IMAGE, N_TEXT = 2, 16, 5


def test_keeps_exactly_the_top_k_by_head_mean_attention():
    g = torch.Generator().manual_seed(0)
    n = START + N_IMAGE + N_TEXT
    h = torch.randn(2, n, 8, generator=g)
    last_attn = torch.rand(2, 4, n, generator=g).softmax(-1)
    valid = torch.ones(2, n, dtype=torch.bool)
    red = PyramidDrop(retain=0.25)(h, LLMSignals(START, N_IMAGE, valid, next_attn=last_attn))
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


def _official_layer(fx: dict, key: str) -> DecoderLayer:
    c = fx["config"]
    cfg = replace(TINY, hidden=c["hidden"], heads=c["heads"], kv_heads=c["heads"], eps=c["eps"])
    layer = DecoderLayer(cfg)
    w = fx["layers"][key]
    with torch.no_grad():
        layer.input_layernorm.weight.copy_(tensor(w["norm"]))
        layer.q_proj.weight.copy_(tensor(w["q"]))
        layer.k_proj.weight.copy_(tensor(w["k"]))
    return layer


@torch.no_grad()
def test_reproduces_the_official_rank_and_drop():
    """Two official stages (``pdrop_rank_drop``, right padding): same kept tokens, same
    features, positions renumbered as the official ``position_ids``."""
    fx = load("pyramiddrop")
    c = fx["config"]
    h, valid = tensor(fx["features"]), torch.tensor(fx["valid"])
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    image_len, state = c["n_image"], {}
    for stage, retain in zip(fx["stages"], (0.5, 0.25), strict=True):
        n = h.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask = causal[None, None] & valid[:, None, None, :]
        last = valid.long().cumsum(1).argmax(1)
        layer = _official_layer(fx, str(stage["rank_layer"]))
        next_attn = layer.last_row_attention(h, positions, mask, last)
        signals = LLMSignals(c["prefix"], image_len, valid, next_attn=next_attn, state=state)
        red = PyramidDrop(retain=retain)(h, signals)
        new_valid = valid.gather(1, red.index)
        for i in range(c["B"]):
            kept = red.index[i][new_valid[i]]
            assert kept.tolist() == stage["kept"][i]
            official = tensor(stage["features_out"][i])[torch.tensor(stage["valid_out"][i])]
            torch.testing.assert_close(red.x[i][new_valid[i]], official, rtol=0, atol=1e-5)
        image_len -= n - red.index.shape[1]
        h, valid = red.x, new_valid
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        official_pos = torch.tensor(stage["position_ids_out"])
        assert torch.equal(positions[valid], official_pos[valid])


class _Positions(LLMReducer):
    """Records the positions a layer's tokens had; drops nothing."""

    needs = frozenset()

    def __init__(self):
        super().__init__()
        self.seen: list[LLMSignals] = []

    def image_budget(self, n_image):
        return n_image, n_image

    def forward(self, h, signals):
        self.seen.append(signals)
        keep = torch.arange(signals.image_len).expand(h.shape[0], -1)
        return keep_image_tokens(h, None, signals.image_start, signals.image_len, keep)


@torch.no_grad()
def test_positions_are_renumbered_and_greedy_decoding_matches_recomputation():
    torch.manual_seed(0)
    probe = _Positions()
    llm = {0: PyramidDrop(retain=0.5), 1: probe, 2: PyramidDrop(retain=0.25)}
    host = LlavaHost(TINY).eval().apply(llm=llm)
    images, prefix, suffix, valid = inputs()
    logits, cache = host.prefill(images, prefix, suffix, valid)
    (seen,) = probe.seen
    for i in range(valid.shape[0]):
        n = int(seen.valid[i].sum())
        assert seen.valid[i, :n].all()  # right padded
        assert seen.positions[i, :n].tolist() == list(range(n))  # 0..n-1 after the drop
    full = START + N_IMAGE + valid.sum(1)
    assert cache["next_pos"].tolist() == full.tolist()
    # Each layer decodes at its own sequence's length: 16 image tokens, then 8, then 4.
    shifts = [cache["layers"][j]["pos_shift"].tolist() for j in range(TINY.layers)]
    assert shifts == [[0] * 3, [8] * 3, [8] * 3, [12] * 3]
    trace, tokens = list(host.last_trace), []
    token = logits.argmax(-1)
    for _ in range(3):
        tokens.append(token)
        cached = host.decode(token, cache)
        # From scratch: the pruned sequence with the generated tokens appended, no cache.
        recomputed, _ = host.prefill(
            images, prefix, suffix, valid, extra_ids=torch.stack(tokens, 1), replay=trace
        )
        torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)
        assert torch.equal(cached.argmax(-1), recomputed.argmax(-1))
        token = cached.argmax(-1)


@torch.no_grad()
def test_renumbering_is_an_option_and_off_keeps_positions():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    host.apply(llm={0: PyramidDrop(retain=0.5, renumber=False)})
    _, cache = host.prefill(*inputs())
    assert all((c["pos_shift"] == 0).all() for c in cache["layers"])
    host.apply(llm={0: PyramidDrop(retain=0.5)}, renumber=False)  # the host option wins
    _, cache = host.prefill(*inputs())
    assert all((c["pos_shift"] == 0).all() for c in cache["layers"])


def test_scoring_after_the_last_layer_raises():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(llm={TINY.layers - 1: PyramidDrop(retain=0.5)})
    with pytest.raises(ValueError, match="next decoder layer"):
        host.prefill(*inputs())
