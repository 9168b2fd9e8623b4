"""HoliTom against its official outer-LLM merge and inner-LLM merge, and its counts."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals
from reference.holitom import SALIENCY, HoliTom, HoliTomLLM, static_windows
from reference.hosts.llava import TINY, LlavaHost, LLMSignals
from tests.reference.conftest import llava_inputs
from tests.reference.fixtures import load, tensor

FX = load("holitom")
CASES, INNER = FX["cases"], FX["inner"]


def run(case: dict, **change):
    t, p, c = case["frames"], case["frame_tokens"], case["dim"]
    x = torch.cat([torch.zeros(1, 1, c), tensor(case["feat"]).view(1, t * p, c)], 1)  # a CLS
    kwargs = dict(retain_ratio=case["retain_ratio"], tau=case["tau"], beta=case["beta"])
    kwargs |= dict(d=case["d"], k=case["k"], max_window=case["max_window"]) | change
    state = {SALIENCY: tensor(case["attn"]).view(1, t * p)}
    torch.manual_seed(case["seed"])  # the official density tie-break draws from it
    method = HoliTom(frame_tokens=p, **kwargs)
    return method(x, Signals(prefix=1, size=torch.ones(1, 1 + t * p, 1), state=state)), method


@pytest.mark.parametrize("case", CASES, ids=[f"seed{c['seed']}" for c in CASES])
def test_reproduces_the_official_outer_merge(case):
    out, method = run(case)
    expected = tensor(case["out"]).view(1, case["out_len"], case["dim"])
    torch.testing.assert_close(out.x[:, 1:], expected, atol=1e-5, rtol=1e-5)
    n = 1 + case["frames"] * case["frame_tokens"]
    low, high = method.budget(n, 1)
    assert low <= out.num_tokens <= high


@pytest.mark.parametrize("case", CASES, ids=[f"seed{c['seed']}" for c in CASES])
def test_windows_are_the_official_ones(case):
    t, p, c = case["frames"], case["frame_tokens"], case["dim"]
    unit = torch.nn.functional.normalize(tensor(case["feat"]).view(t, p, c), dim=-1)
    above = torch.nn.functional.cosine_similarity(unit[:-1], unit[1:], dim=-1) > case["tau"]
    windows, saved = static_windows(above, case["max_window"])
    assert [list(w) for w in windows] == case["windows"] and saved == case["total_reduced"]


@pytest.mark.parametrize("case", INNER, ids=[f"seed{c['seed']}" for c in INNER])
def test_reproduces_the_official_inner_merge(case):
    pre, nv, post, c, heads = (case[k] for k in ("prefix", "image_len", "suffix", "dim", "heads"))
    n = pre + nv + post
    h = tensor(case["h"]).view(1, n, c)
    last = tensor(case["last_row"]).view(1, heads, n)
    signals = LLMSignals(pre, nv, torch.ones(1, n, dtype=torch.bool), last_attn=last)
    out = HoliTomLLM(r=case["r"])(h, signals)
    assert out.index[0].tolist() == case["keep"]
    torch.testing.assert_close(out.x, tensor(case["out"]).view(1, -1, c), atol=1e-5, rtol=1e-5)


def test_a_changed_option_breaks_the_fixture():
    case = CASES[0]
    expected = tensor(case["out"]).view(1, case["out_len"], case["dim"])
    for change in ({"beta": 0.5}, {"tau": 0.8}, {"k": 3}, {"retain_ratio": 0.3}):
        out, _ = run(case, **change)
        same = out.x[:, 1:].shape == expected.shape and torch.allclose(out.x[:, 1:], expected)
        assert not same, change


def test_paper_counts():
    """LLaVA-OneVision: 32 frames of 196 tokens at 10%: about 627 kept; k = 18, r = 0.5."""
    method = HoliTom()
    low, high = method.budget(32 * 196, 0)
    assert low <= round(0.1 * 32 * 196) <= high
    assert HoliTomLLM.paper_placement(28)[17].r == 0.5
    assert HoliTomLLM(0.5).image_budget(627) == (314, 314)  # round(313.5) -> 314


@torch.no_grad()
def test_both_stages_on_the_llava_host():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    host.apply(
        vision=HoliTom(frame_tokens=4, retain_ratio=0.5, tau=0.0, noise=False),
        llm={1: HoliTomLLM(0.5)},
    )
    images, prefix, suffix, valid = llava_inputs()
    logits, cache = host.prefill(images, prefix, suffix, valid)
    assert torch.isfinite(host.decode(logits.argmax(-1), cache)).all()
