"""AVG-LLaVA: pooled granularities of the projected tokens and the router's choice."""

from __future__ import annotations

import pytest
import torch

from reference.avg_llava import AVGLLaVA, granularity_pool
from reference.projector import ProjectorSignals
from tests.reference.fixtures import load, tensor

GOLDEN = load("avg_llava")


def build(**kwargs) -> AVGLLaVA:
    cfg = GOLDEN["config"]
    method = AVGLLaVA(
        cfg["in_dim"],
        cfg["out_dim"],
        vis_token_granularity=tuple(cfg["vis_token_granularity"]),
        filtered_text_num=cfg["filtered_text_num"],
        **kwargs,
    ).eval()
    method.load_state_dict({k: tensor(v) for k, v in GOLDEN["weights"].items()})
    return method


@pytest.mark.parametrize(
    "case", GOLDEN["cases"], ids=lambda c: f"v{c['views']}-t{len(c['text'][0])}-{c['chosen']}"
)
def test_reproduces_the_official_router_golden_fixture(case):
    """The official projector, pooling and ``Router`` with the same weights (keys as there, less
    ``model.``): same logits, same chosen granularity and the same tokens for every image."""
    method = build()
    x, text = tensor(case["x"]), tensor(case["text"])
    mask = torch.tensor(case["text_mask"])
    views = x if case["views"] > 1 else x.unsqueeze(1)
    with torch.no_grad():
        out, counts, logits = method.route(views, (4, 4), text, mask)
    torch.testing.assert_close(logits, tensor(case["router_logits"]), atol=1e-5, rtol=1e-5)
    assert counts.tolist() == case["chosen"]
    for i, (expected, m) in enumerate(zip(case["out"], case["chosen"], strict=True)):
        got = out[i] if case["views"] > 1 else out[i, 0]
        torch.testing.assert_close(got[..., :m, :], tensor(expected), atol=1e-5, rtol=1e-5)
        assert not got[..., m:, :].any()
    if case["views"] == 1:  # forward: the same tokens, the counts in the state
        signals = ProjectorSignals(grid=(4, 4), state={"text": text, "text_mask": mask})
        with torch.no_grad():
            torch.testing.assert_close(method(x, signals), out[:, 0])
        assert signals.state["avg_llava"]["num_tokens"].tolist() == case["chosen"]


@pytest.mark.parametrize("granularity", [2, 8])
def test_a_fixed_granularity_is_the_official_pooling_path(granularity):
    method = build(granularity=granularity)
    with torch.no_grad():
        out = method(tensor(GOLDEN["fixed"]["x"]), ProjectorSignals(grid=(4, 4)))
    expected = tensor(GOLDEN["fixed"]["out"][str(granularity)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert method.num_tokens(16) == granularity


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """CLIP-L (1024) -> Vicuna-7B (4096), granularities 36..576, 32 text tokens: the
    ``mm_projector`` plus the ``Router``."""
    with torch.device("meta"):
        count = sum(p.numel() for p in AVGLLaVA().parameters())
    assert count == GOLDEN["parameters_at_default"] == 138_486_923


def test_the_paper_granularities_of_576_patches():
    x = torch.randn(1, 576, 4)
    counts = [granularity_pool(x, (24, 24), g).shape[1] for g in (36, 72, 144, 288, 576)]
    assert counts == [36, 72, 144, 288, 576]
    # 288 = 1x2 means along a row, 72 = 2x4 means
    torch.testing.assert_close(granularity_pool(x, (24, 24), 288)[0, 0], x[0, :2].mean(0))
    cell = x.view(24, 24, 4)[:2, :4].reshape(8, 4).mean(0)
    torch.testing.assert_close(granularity_pool(x, (24, 24), 72)[0, 0], cell)
    assert AVGLLaVA(8, 16, merger_heads=2).num_tokens(576) == 576


def test_gradients_reach_the_router_through_the_straight_through_choice():
    method = build().train()
    out = method(torch.randn(2, 16, 8), ProjectorSignals(grid=(4, 4)))
    out.square().sum().backward()
    assert method.router.voter.grad.abs().sum() > 0
    assert method.router.router[2].weight.grad.abs().sum() > 0


def test_a_granularity_the_grid_cannot_reach_is_refused():
    method = AVGLLaVA(8, 16, vis_token_granularity=(3, 16), merger_heads=2)
    with pytest.raises(ValueError, match=r"^vis_token_granularity must be"):
        method(torch.randn(1, 16, 8), ProjectorSignals(grid=(4, 4)))
    with pytest.raises(ValueError, match=r"^vis_token_granularity must be"):
        AVGLLaVA(8, 16, vis_token_granularity=(16, 8), merger_heads=2)
