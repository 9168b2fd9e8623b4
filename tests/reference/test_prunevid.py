"""PruneVid against its official merge (``merge_frames_dynamic``) and in-LLM step."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals
from reference.hosts.llava import TINY, LlavaHost, LLMSignals
from reference.prunevid import LAYOUT, PruneVid, PruneVidLLM, refine_runs, run_lengths
from tests.reference.conftest import llava_inputs
from tests.reference.fixtures import load, tensor

CASES = load("prunevid")["cases"]


def run(case: dict, **change):
    t, p, c = case["frames"], case["frame_tokens"], case["dim"]
    x = torch.cat([torch.zeros(1, 1, c), tensor(case["x"]).view(1, t * p, c)], 1)  # a CLS
    kwargs = dict(tau=case["tau"], temporal_ratio=case["temporal_segment_ratio"])
    kwargs |= dict(cluster_ratio=case["cluster_ratio"]) | change
    torch.manual_seed(case["seed"])  # the official density tie-break draws from it
    signals = Signals(prefix=1, size=torch.ones(1, 1 + t * p, 1))
    return PruneVid(frame_tokens=p, **kwargs)(x, signals), signals.state


@pytest.mark.parametrize("case", CASES, ids=[f"seed{c['seed']}" for c in CASES])
def test_reproduces_the_official_merge(case):
    out, state = run(case)
    expected = tensor(case["out"]).view(1, -1, case["dim"])
    torch.testing.assert_close(out.x[:, 1:], expected, atol=1e-5, rtol=1e-5)
    layout = state[LAYOUT][0]
    assert [w[0] for w in layout] == case["static_sizes"]
    assert [w[1] for w in layout] == case["dynamic_sizes"]
    assert [w[2] for w in layout] == case["window_sizes"]
    assert out.size.sum() == out.assign.shape[1] and (out.assign >= 0).all()


@pytest.mark.parametrize("case", CASES, ids=[f"seed{c['seed']}" for c in CASES])
def test_llm_step_keeps_the_official_tokens(case):
    att = tensor(case["text_attn"]).view(2, 3, -1)  # [H, Q, N']
    heads, q, nv = att.shape
    n = 2 + nv + q
    attn = torch.zeros(1, heads, n, n)
    attn[0, :, 2 + nv :, 2 : 2 + nv] = att
    layout = list(
        zip(case["static_sizes"], case["dynamic_sizes"], case["window_sizes"], strict=True)
    )
    signals = LLMSignals(
        2, nv, torch.ones(1, n, dtype=torch.bool), attn=attn, state={LAYOUT: [layout]}
    )
    out = PruneVidLLM(alpha=case["alpha"])(torch.randn(1, n, 4), signals)
    assert (out.index[0, 2:-q] - 2).tolist() == case["llm_keep"]


def test_a_changed_option_breaks_the_fixture():
    case = CASES[0]
    expected = tensor(case["out"]).view(1, -1, case["dim"])
    for change in ({"tau": 0.3}, {"cluster_ratio": 0.4}, {"cluster_above": 20}, {"k": 5}):
        out, _ = run(case, **change)
        same = out.x[:, 1:].shape == expected.shape and torch.allclose(out.x[:, 1:], expected)
        assert not same, change


def test_refined_runs_follow_the_longer_neighbour():
    assert refine_runs([0, 0, 1, 0, 0, 0, 2, 2]) == [0, 0, 0, 0, 0, 0, 2, 2]
    assert refine_runs([0, 1, 0, 1]) == [0, 0, 0, 0]  # no run longer than 1: label 0
    assert refine_runs([3, 3, 1, 2, 2, 2]) == [3, 3, 2, 2, 2, 2]
    assert run_lengths([0, 0, 2, 2, 2, 0]) == [2, 3, 1]


def test_paper_counts():
    """PLLaVA: 16 frames of 12 x 12; a static set of 144 positions clusters to 72."""
    method = PruneVid()
    assert method.frame_tokens == 144 and method._size(144) == 72 and method._size(14) == 14
    assert int(16 * method.temporal_ratio) == 4
    assert PruneVidLLM.paper_placement(32)[10].alpha == 0.4


@torch.no_grad()
def test_both_stages_on_the_llava_host():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    host.apply(vision=PruneVid(frame_tokens=4, tau=0.0, noise=False), llm={1: PruneVidLLM(0.5)})
    images, prefix, suffix, valid = llava_inputs()
    logits, cache = host.prefill(images, prefix, suffix, valid)
    assert torch.isfinite(host.decode(logits.argmax(-1), cache)).all()
    layouts = host.last_state[LAYOUT]
    for i, layout in enumerate(layouts):
        kept = host.last_trace[0][i]
        real = sum(s + d for s, d, _ in layout)
        assert real < 16 or layout[0][0] == 0
        assert (kept[2:-5] - 2 < real).sum() == sum(
            int(s * 0.5) + w * int(d // w * 0.5) for s, d, w in layout
        )
