"""FastVID against its official block (LLaVA-OneVision's Qwen2 forward), and its counts."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals
from reference.fastvid import GLOBAL, SALIENCY, FastVID, segments
from tests.reference.fixtures import load, tensor

CASES = load("fastvid")["cases"]
NAMES = {"retention_ratio": "ratio", "DySeg_c": "c", "DySeg_tau": "tau", "STPrune_d": "d"}
NAMES |= {"DTM_p": "p", "DTM_beta": "beta"}


def run(case: dict, **change):
    t, p, c, pre = case["frames"], case["frame_tokens"], case["dim"], case["prefix"]
    n = pre + t * p + case["suffix"]
    x = tensor(case["hidden"]).view(1, n, c)
    state = {
        SALIENCY: tensor(case["saliency"]).view(1, t * p),
        GLOBAL: tensor(case["global_features"]).view(1, t, -1),
    }
    kwargs = {NAMES[k]: v for k, v in case["params"].items()} | change
    torch.manual_seed(case["seed"])  # the official density tie-break draws from it
    method = FastVID(frame_tokens=p, **kwargs)
    return method(x, Signals(prefix=pre, size=torch.ones(1, n, 1), state=state)), method


@pytest.mark.parametrize("case", CASES, ids=[f"seed{c['seed']}" for c in CASES])
def test_reproduces_the_official_block(case):
    """The prefix and suffix stand for the text around the video (all kept)."""
    out, method = run(case)
    assert out.index[0].tolist() == case["keep"]
    expected = tensor(case["out"]).view(1, len(case["keep"]), case["dim"])
    torch.testing.assert_close(out.x, expected, atol=1e-5, rtol=1e-5)
    glob = tensor(case["global_features"]).view(case["frames"], -1)
    assert segments(glob, method.c, method.tau) == case["segments"]
    n = case["prefix"] + case["frames"] * case["frame_tokens"] + case["suffix"]
    low, high = method.budget(n, case["prefix"])
    assert low <= out.num_tokens <= high
    assert out.size.sum() == n  # every token went somewhere


def test_a_changed_option_breaks_the_fixture():
    case = CASES[0]
    for change in ({"beta": 0.3}, {"p": 2}, {"d": 0.5}):
        out, _ = run(case, **change)
        same = out.index[0].tolist() == case["keep"]
        if same:
            expected = tensor(case["out"]).view(1, len(case["keep"]), case["dim"])
            same = torch.allclose(out.x, expected, atol=1e-5)
        assert not same, change


def test_llava_onevision_counts():
    """196 tokens per frame at retention 0.10: 19 kept, 12 salient and 7 anchors."""
    method = FastVID()
    assert method.counts() == (12, 7)
    assert method.budget(32 * 196, 0)[1] == 32 * 19
    # A one-frame segment keeps 7 anchors; a five-frame one 2 anchor frames of 17.
    assert 7 * 5 // -(-5 // method.p) == 17


def test_each_segment_is_cut_where_the_video_changes():
    g = torch.tensor([[1.0, 0], [1, 0.01], [0, 1], [0, 1], [0.02, 1], [1, 1]])
    assert segments(g, c=1, tau=0.9) == [2, 3, 1]
    assert segments(g, c=3, tau=0.0) == [2, 3, 1]
    assert segments(g, c=4, tau=0.0) == [2, 2, 1, 1]  # the 3rd lowest: frames 3 -> 4
    assert segments(g, c=1, tau=0.5) == [2, 4]  # cos 0.72 of frames 4 -> 5 is kept
