"""MustDrop's own invariants, for all three stages (vision, prefill, decoding)."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals
from reference.hosts.llava import TINY, LlavaHost, LLMSignals
from reference.mustdrop import (
    KEY,
    MustDrop,
    MustDropDecoding,
    MustDropVision,
    dual_attention_scores,
    window_similarity,
)
from tests.reference.conftest import assert_cached_decoding_matches, make_signals, tokens
from tests.reference.fixtures import load, tensor
from tests.reference.test_vlm_contract import inputs

START, N_IMAGE, N_TEXT = 2, 16, 5


# -- vision encoding ---------------------------------------------------------------
def test_window_similarity_is_the_mean_off_diagonal_cosine():
    x = tokens()[:, 1:]  # [B, 16, C], a 4x4 grid
    sim, cells = window_similarity(x, 2)
    assert cells[1].tolist() == [2, 3, 6, 7]
    w = torch.nn.functional.normalize(x[0, [2, 3, 6, 7]], dim=-1)
    pairwise = w @ w.T
    torch.testing.assert_close(sim[0, 1], (pairwise.sum() - pairwise.trace()) / 12)


def test_vision_merges_the_most_similar_windows_into_their_last_token():
    x = tokens().clone()
    x[0, 1 + torch.tensor([0, 1, 4, 5])] = x[0, 1] + 1e-3 * torch.randn(4, x.shape[-1])
    signals = make_signals(x)
    red = MustDropVision(window=2, merge=1, key_rate=0.25, order="spatial")(x, signals)
    assert red.num_tokens == 1 + 16 - 3 and red.x.shape[1] == MustDropVision(2, 1).budget(17, 1)[0]
    # Sample 0: window {0, 1, 4, 5} (patches) is near-duplicate, so it is the one merged.
    assert red.index[0].tolist() == [0] + [1 + p for p in range(16) if p not in (0, 1, 4)]
    slot = int(red.assign[0, 1 + 5])
    assert (red.assign[0, 1 + torch.tensor([0, 1, 4, 5])] == slot).all()
    torch.testing.assert_close(red.x[0, slot], x[0, 1 + torch.tensor([0, 1, 4, 5])].mean(0))
    assert red.size[0, slot, 0] == 4 and red.size.sum() == x.shape[0] * 17
    assert (red.index.diff(dim=1) > 0).all()  # spatial order kept
    key = signals.state[KEY]
    assert key.shape == (3, 13) and (key.sum(1) == 4).all()  # ceil(0.25 * 13)
    # The official order: the merged token right after the CLS, then the rest in order.
    official = MustDropVision(window=2, merge=1, key_rate=0.25)(x, make_signals(x))
    rest = [1 + p for p in range(16) if p not in (0, 1, 4, 5)]
    assert official.index[0].tolist() == [0, 1 + 5, *rest]
    torch.testing.assert_close(official.x[0, 1], red.x[0, slot])


GOLDEN = load("mustdrop")


@pytest.mark.parametrize("case", GOLDEN["vision"], ids=lambda c: f"w{c['window']}-r{c['merged']}")
def test_reproduces_the_official_local_merge_golden_fixture(case):
    """Same merged windows, order and size-weighted means as the official
    ``conditional_pooling`` + ``merge_wavg``, with the merge count from the threshold
    (minimum over the batch) as there."""
    x = tensor(case["x"])
    b, n, _ = x.shape
    vision = MustDropVision(
        window=case["window"], threshold=case["threshold"], key_rate=0.0, batch_min=True
    )
    red = vision(x, Signals(prefix=1, size=torch.ones(b, n, 1), cls_attn=torch.rand(b, 1, n)))
    assert red.num_tokens == n - case["merged"] * (case["window"] ** 2 - 1)
    assert red.index.tolist() == case["index"]
    torch.testing.assert_close(red.x, tensor(case["out"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(red.size[..., 0], tensor(case["size"]))


def test_vision_key_set_is_the_top_cls_attention():
    x = tokens()
    signals = make_signals(x)
    MustDropVision(window=2, merge=0, key_rate=0.25)(x, signals)
    top = signals.cls_attn.mean(1)[:, 1:].topk(4, dim=1).indices
    assert torch.equal(signals.state[KEY].nonzero()[:, 1].view(3, 4), top.sort(1).values)


@torch.no_grad()
def test_vision_stage_through_llava_and_cached_decoding():
    torch.manual_seed(0)
    vision = MustDropVision(window=2, merge=2, key_rate=0.25)
    host = LlavaHost(TINY).eval().apply(vision=vision, llm={1: MustDrop(ratio=0.5)})
    images, prefix, suffix, valid = inputs()
    logits, cache = host.prefill(images, prefix, suffix, valid)
    state = host.last_state  # the host's working copy of the scratch state
    (index,) = host.last_trace
    assert index.shape[1] == START + 5 + N_TEXT  # 16 - 2*3 = 10 image tokens, half kept
    assert (state[KEY].sum(1) == 3).all()  # the ceil(0.25 * 10) key tokens all survived
    token = logits.argmax(-1)
    cached = host.decode(token, cache)
    recomputed, _ = host.prefill(
        images, prefix, suffix, valid, extra_ids=token[:, None], replay=list(host.last_trace)
    )
    torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)


# -- prefilling ----------------------------------------------------------------------
def llm_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = START + N_IMAGE + N_TEXT
    h = torch.randn(2, n, 8, generator=g)
    attn = (3 * torch.randn(2, 4, n, n, generator=g)).softmax(-1)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, -2:] = False
    return h, attn, valid


def official_filter(attn, start, length, gthr, ithr):
    """The official rule for one sample ``attn [H, N, N]``: keep unless both are low."""
    a = attn[:, start + length :, start : start + length].mean(0)  # [T, Nv]
    glob = a.sum(0)
    return ~((glob < glob.sum() * gthr) & (a.max(0).values < ithr))


def test_adaptive_mode_keeps_what_the_official_threshold_rule_keeps():
    h, attn, valid = llm_case()
    valid[:] = True
    gthr, ithr = 0.06, 0.15
    expected = [official_filter(attn[i], START, N_IMAGE, gthr, ithr) for i in range(2)]
    assert 0 < min(int(e.sum()) for e in expected) < N_IMAGE  # the case really prunes
    for i in range(2):
        red = MustDrop(None, gthr, ithr)(
            h[i : i + 1], LLMSignals(START, N_IMAGE, valid[i : i + 1], attn=attn[i : i + 1])
        )
        kept = red.index[0, START : red.num_tokens - N_TEXT] - START
        assert torch.equal(kept, expected[i].nonzero()[:, 0])


def test_fixed_count_keeps_key_tokens_then_the_top_importance():
    h, attn, valid = llm_case()
    key = torch.zeros(2, N_IMAGE, dtype=torch.bool)
    key[:, [0, 15]] = True
    state = {KEY: key}
    signals = LLMSignals(START, N_IMAGE, valid, attn=attn, state=state)
    red = MustDrop(ratio=0.75)(h, signals)  # keeps 4
    imp = dual_attention_scores(attn, valid, START, N_IMAGE, 1e-3, 1e-3)
    kept = red.index[:, START : START + 4] - START
    assert (kept[:, 0] == 0).all() and (kept[:, -1] == 15).all()
    top_rest = imp[:, 1:15].topk(2, dim=1).indices + 1
    assert torch.equal(kept[:, 1:3], top_rest.sort(1).values)
    assert state[KEY].shape == (2, 4) and state[KEY].sum() == 4  # key set follows the tokens


@pytest.mark.parametrize("case", GOLDEN["prefill"], ids=lambda c: f"nv{c['image_len']}")
def test_reproduces_the_official_dual_attention_filter_golden_fixture(case):
    """Same kept image tokens (filter plus key set), new key-set positions and hidden
    states as the official ``dual_attention_filter`` and the forward's union after it
    (batch 1: the official code reads batch item 0)."""
    start, nv = case["image_start"], case["image_len"]
    h, text_attn = tensor(case["h"]), tensor(case["text_attn"])
    heads = text_attn.shape[1]
    n = h.shape[1]
    attn = torch.zeros(1, heads, n, n)  # the filter reads only the text -> image block
    attn[:, :, start + nv :, start : start + nv] = text_attn
    key = torch.zeros(1, nv, dtype=torch.bool)
    key[0, case["key_set"]] = True
    state = {KEY: key}
    signals = LLMSignals(start, nv, torch.ones(1, n, dtype=torch.bool), attn=attn, state=state)
    red = MustDrop(None, case["global_thr"], case["individual_thr"])(h, signals)
    assert red.index[0].tolist() == case["index"]
    assert len(case["filtered"]) < len(case["kept"]) or not case["key_set"]
    assert state[KEY][0].nonzero()[:, 0].tolist() == case["key_after"]
    torch.testing.assert_close(red.x, tensor(case["out"]))


def test_padding_rows_are_not_queries():
    _, attn, valid = llm_case()
    changed = attn.clone()
    changed[1, :, -2:] = torch.rand_like(changed[1, :, -2:])  # sample 1's padding rows
    a = dual_attention_scores(attn, valid, START, N_IMAGE, 1e-3, 1e-3)
    b = dual_attention_scores(changed, valid, START, N_IMAGE, 1e-3, 1e-3)
    torch.testing.assert_close(a, b)


# -- decoding --------------------------------------------------------------------------
@torch.no_grad()
def test_compressed_cache_equals_masking_the_dropped_tokens():
    torch.manual_seed(0)
    layers = [1, 2]
    host = LlavaHost(TINY).eval().apply(llm={p: MustDrop(ratio=0.5) for p in layers})
    images, prefix, suffix, valid = inputs()
    logits, cache = host.prefill(images, prefix, suffix, valid)
    trace = list(host.last_trace)
    final_len = trace[-1].shape[1]
    compressed = MustDropDecoding().apply(host, cache)
    lengths = [lc["k"].shape[2] for lc in compressed["layers"]]
    assert lengths == [cache["layers"][0]["k"].shape[2], final_len, final_len, final_len]
    assert cache["layers"][1]["k"].shape[2] > final_len  # the input cache is left intact
    # Reference: the uncompressed cache with the dropped tokens masked out.
    masked = {**cache, "layers": [dict(lc) for lc in cache["layers"]]}
    sel1 = trace[0].gather(1, trace[1])  # full sequence -> final set
    for i, sel in ((1, sel1), (2, trace[1])):
        keep = torch.zeros_like(masked["layers"][i]["valid"]).scatter_(1, sel, True)
        masked["layers"][i]["valid"] = masked["layers"][i]["valid"] & keep
    # Positions renumbered (the default): each layer decodes at its cache's length.
    for lc, mc in zip(compressed["layers"], masked["layers"], strict=True):
        position = compressed["next_pos"] - lc["pos_shift"]
        assert position.tolist() == lc["valid"].sum(1).tolist()
        mc["pos_shift"] = cache["next_pos"] - mc["valid"].sum(1)
    token = logits.argmax(-1)
    torch.testing.assert_close(
        host.decode(token, compressed), host.decode(token, masked), rtol=1e-4, atol=1e-5
    )
    assert not torch.allclose(host.decode(token, compressed), host.decode(token, cache))


@torch.no_grad()
def test_positions_are_renumbered_by_default_and_kept_with_renumber_off():
    torch.manual_seed(0)
    images, prefix, suffix, valid = inputs()
    host = LlavaHost(TINY).eval().apply(llm={1: MustDrop(ratio=0.5)})
    _, cache = host.prefill(images, prefix, suffix, valid)
    # After the drop after layer 1, layers 2 and 3 decode 8 positions earlier.
    shifts = [lc["pos_shift"].tolist() for lc in cache["layers"]]
    assert shifts == [[0] * 3, [0] * 3, [8] * 3, [8] * 3]
    assert assert_cached_decoding_matches(host, images, prefix, suffix, valid) > 0
    host.apply(llm={1: MustDrop(ratio=0.5, renumber=False)})
    _, cache = host.prefill(images, prefix, suffix, valid)
    assert all((lc["pos_shift"] == 0).all() for lc in cache["layers"])
    compressed = MustDropDecoding().apply(host, cache)
    assert all((torch.as_tensor(lc["pos_shift"]) == 0).all() for lc in compressed["layers"])


def test_by_default_each_image_merges_its_own_windows_over_the_threshold():
    """The official count is the batch's minimum; here an image gets what it gets alone,
    the batch padded with empty slots (mask 0, size 0, not in the key set)."""
    case = GOLDEN["vision"][0]
    x = tensor(case["x"])
    b, n, _ = x.shape
    cls = torch.rand(b, 1, n, generator=torch.Generator().manual_seed(0))
    vision = MustDropVision(window=case["window"], threshold=0.3, key_rate=0.5)
    sig = Signals(prefix=1, size=torch.ones(b, n, 1), cls_attn=cls)
    red = vision(x, sig)
    widths = []
    for i in range(b):
        one_sig = Signals(prefix=1, size=torch.ones(1, n, 1), cls_attn=cls[i : i + 1])
        one = vision(x[i : i + 1], one_sig)
        k = one.num_tokens
        widths.append(k)
        torch.testing.assert_close(red.x[i, :k], one.x[0])
        assert red.index[i, :k].tolist() == one.index[0].tolist()
        assert sig.state[KEY][i, : k - 1].tolist() == one_sig.state[KEY][0].tolist()
        assert not sig.state[KEY][i, k - 1 :].any()
    assert len(set(widths)) > 1, "the case should give the images different counts"
    assert red.mask is not None and red.mask.sum(1).tolist() == widths
