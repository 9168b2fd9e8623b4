"""SparseVLM against its official sparse-layer step, and its paper's token counts."""

from __future__ import annotations

import pytest
import torch

from reference.hosts.llava import TINY, LlavaHost, LLMSignals
from reference.sparsevlm import EMBEDS, RATERS, SparseVLM
from tests.reference.conftest import llava_inputs
from tests.reference.fixtures import load, tensor

CASES = load("sparsevlm")["cases"]


def run(case: dict, **kwargs):
    pre, nv, nt, c, heads = (case[k] for k in ("prefix", "image_len", "text_len", "dim", "heads"))
    n = pre + nv + nt
    embeds = tensor(case["embeds"]).view(1, n, c)
    h = tensor(case["h"]).view(1, n, c)
    attn = torch.zeros(1, heads, n, n)  # only the rater-to-image block is ever read
    attn[:, :, pre + nv :, pre : pre + nv] = tensor(case["text_attn"]).view(1, heads, nt, nv)
    state = {EMBEDS: embeds}
    torch.manual_seed(case["seed"])  # the official density tie-break draws from it
    signals = LLMSignals(pre, nv, torch.ones(1, n, dtype=torch.bool), attn=attn, state=state)
    return SparseVLM(keep=case["keep"], **kwargs)(h, signals), state


@pytest.mark.parametrize("case", CASES, ids=[f"seed{c['seed']}" for c in CASES])
def test_reproduces_the_official_step(case):
    out, state = run(case)
    pre, kept, k = case["prefix"], case["kept"], case["clusters"]
    assert state[RATERS][0].nonzero()[:, 0].tolist() == case["raters"]
    assert out.index[0, pre : pre + len(kept)].tolist() == [pre + i for i in kept]
    assert out.num_tokens == case["out_len"]
    # The recycled tokens are those the official code clustered, each in one cluster.
    recycled = (out.assign[0, pre : pre + case["image_len"]] >= pre + len(kept)).nonzero()[:, 0]
    assert sorted(recycled.tolist()) == sorted(case["recycled"])
    assert out.size[0, pre + len(kept) : pre + len(kept) + k].sum() == len(case["recycled"])
    expected = tensor(case["out"]).view(1, case["out_len"], case["dim"])
    torch.testing.assert_close(out.x, expected, atol=1e-5, rtol=1e-5)


def test_a_changed_option_breaks_the_fixture():
    case = CASES[0]
    out, _ = run(case, recycle_ratio=0.5)
    assert out.num_tokens != case["out_len"]
    out, _ = run(case, cluster_ratio=0.0)  # one cluster instead of two
    expected = tensor(case["out"]).view(1, case["out_len"], case["dim"])
    assert out.x.shape != expected.shape


def test_official_counts_for_llava_1_5():
    """64 tokens: 66/30/17 kept at layers 2/6/15, plus the recycled clusters."""
    sched = SparseVLM.schedule(64)
    assert sorted(sched) == [2, 6, 15] and [m.keep for m in sched.values()] == [66, 30, 17]
    n, seen = 576, []
    for method in sched.values():
        kept, m, k = method.counts(n)
        n = kept + k
        seen.append((kept, m, k))
    # 510 dropped: 154 recycled into 16 clusters; then 82 -> 30 + 2; 32 -> 17 + 1.
    assert seen == [(66, 154, 16), (30, 16, 2), (17, 5, 1)]
    assert [m.keep for m in SparseVLM.schedule(192).values()] == [300, 200, 110]
    assert SparseVLM.paper_placement(32, retained=128)[15].keep == 36


def test_recycling_through_the_host_decodes():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(llm={1: SparseVLM(keep=6), 2: SparseVLM(keep=3)})
    images, prefix, suffix, valid = llava_inputs()
    with torch.no_grad():
        logits, cache = host.prefill(images, prefix, suffix, valid)
        assert torch.isfinite(host.decode(logits.argmax(-1), cache)).all()
    # 16 -> 6 kept + 1 cluster of int(0.3 * 10) + 1 = 4; 7 -> 3 + 1.
    assert cache["layers"][-1]["valid"].shape[1] == 2 + 4 + 5 + 1
    assert host.last_trace[0].shape[1] == 2 + 7 + 5


def test_each_sample_chooses_its_own_raters():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(llm={1: SparseVLM(keep=6, noise=False)})
    images, prefix, suffix, valid = llava_inputs()
    with torch.no_grad():
        together, _ = host.prefill(images, prefix, suffix, valid)
        for i in range(images.shape[0]):
            n = int(valid[i].sum())
            alone, _ = host.prefill(
                images[i : i + 1], prefix[i : i + 1], suffix[i : i + 1, :n], valid[i : i + 1, :n]
            )
            torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)
