"""Dynamic-VLM: each frame pooled to a grid sized by the frame count and the token budget."""

from __future__ import annotations

import pytest
import torch

from reference.dynamic_vlm import DynamicVLM, frame_token_count
from reference.hosts.llava import TINY, LlavaHost
from reference.projector import ProjectorSignals
from tests.reference.conftest import llava_inputs
from tests.reference.fixtures import load, tensor

GOLDEN = load("dynamic_vlm")
CASES = GOLDEN["cases"]
IDS = [f"k{c['out_token_num']}-budget{c['max_video_tokens']}-T{c['frames']}" for c in CASES]
KEYS = ("in_token_num", "out_token_num", "min_out_token_num", "max_video_tokens")


def tiny(case: dict, **overrides) -> DynamicVLM:
    method = DynamicVLM(8, 6, **{**{k: case[k] for k in KEYS}, **overrides}).eval()
    method.load_state_dict({k: tensor(v) for k, v in GOLDEN["weights"].items()})
    return method


def run(method: DynamicVLM, case: dict) -> torch.Tensor:
    x = tensor(case["x"])  # [B, T, N, C]
    s = ProjectorSignals(grid=(4, 4), state={"frames": case["frames"]})
    with torch.no_grad():
        return method(x.flatten(1, 2), s)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reproduces_the_official_golden_fixture(case):
    """The official ``DynamicSpatialPooling`` (eval) and ``mlp2x_gelu`` projector with the same
    weights (their names load as they are): raw frames, 3 x 3 and 2 x 2 pools, a budget that is
    not a square."""
    torch.testing.assert_close(run(tiny(case), case), tensor(case["out"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["budget", "cap", "in_token_num"])
def test_the_fixture_test_fails_when_an_option_is_perturbed(change):
    case = next(c for c in CASES if c["frames"] == 3)  # 36 // 3 = 12 -> 3 x 3
    overrides = {
        "budget": {"max_video_tokens": 48},  # 16 a frame: raw
        "cap": {"out_token_num": 4},  # 2 x 2
        "in_token_num": {"in_token_num": 9},  # 9 is then "raw": the 4 x 4 frame is kept
    }[change]
    if change == "in_token_num":
        case = next(c for c in CASES if c["out_token_num"] == 9)
    out, expected = run(tiny(case, **overrides), case), tensor(case["out"])
    assert out.shape != expected.shape or not torch.allclose(out, expected, atol=1e-5)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """CLIP-L (1024) -> Qwen2.5-7B (3584), ``mlp2x_gelu`` (the sample config); the pooling has
    no parameters. The released 14B model's LLM width (5120) as well."""
    with torch.device("meta"):
        default, wide = DynamicVLM(), DynamicVLM(out_dim=5120)
    count = sum(p.numel() for p in default.parameters())
    assert count == GOLDEN["parameters_at_default"] == 16_522_240
    count = sum(p.numel() for p in wide.parameters())
    assert count == GOLDEN["parameters_qwen2_5_14b"]


def test_the_sample_configs_token_counts_by_video_length():
    """576 patches a frame, budget 3200: up to 5 frames raw, then floor(sqrt(3200 // T))^2."""
    method = DynamicVLM(in_dim=4, out_dim=4)
    assert method.num_tokens(576) == 576
    assert method.num_tokens(5 * 576, frames=5) == 5 * 576
    assert method.num_tokens(6 * 576, frames=6) == 6 * 23 * 23  # 533 -> 23 x 23
    assert method.num_tokens(100 * 576, frames=100) == 100 * 25  # 32 -> 5 x 5
    assert method.num_tokens(4000 * 576, frames=4000) == 4000  # budget spent: 1 x 1, as there
    x = torch.randn(1, 8 * 576, 4)
    out = method.eval()(x, ProjectorSignals(grid=(24, 24), state={"frames": 8}))
    assert out.shape == (1, 8 * 20 * 20, 4)  # 400 a frame
    assert frame_token_count(8, 576, 3200) == 400
    with torch.device("meta"):
        assert DynamicVLM(**DynamicVLM.count_setting(64, 576)).num_tokens(576) == 64


def test_frames_are_pooled_independently_in_order():
    case = next(c for c in CASES if c["frames"] == 3)
    method, x = tiny(case), tensor(case["x"])  # [2, 3, 16, 8]
    video = run(method, case)  # 9 tokens a frame
    pooled = torch.nn.functional.adaptive_avg_pool2d(
        x.flatten(0, 1).transpose(1, 2).unflatten(2, (4, 4)), 3
    )
    with torch.no_grad():
        expected = method.llm_proj(pooled.flatten(2).transpose(1, 2)).reshape(2, 27, 6)
    torch.testing.assert_close(video, expected)


def test_training_draws_a_count_between_the_minimum_and_the_cap():
    method = DynamicVLM(4, 4, in_token_num=64, out_token_num=36, min_out_token_num=4).train()
    counts = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = method(torch.randn(1, 64, 4), ProjectorSignals(grid=(8, 8)))
        counts.add(out.shape[1])
    assert counts <= {4, 9, 16, 25, 36} and len(counts) > 1
    method.fix_randam = True  # the evaluation rule in training too
    assert method(torch.randn(1, 64, 4), ProjectorSignals(grid=(8, 8))).shape[1] == 36


def test_settings_the_paper_cannot_express_are_refused():
    with pytest.raises(ValueError, match="out_token_num"):
        DynamicVLM(out_token_num=600)
    method = DynamicVLM(4, 4, in_token_num=576, out_token_num=144, min_out_token_num=16)
    with pytest.raises(ValueError, match="out_token_num"):  # 144 cells from a 4 x 4 frame
        method.eval()(torch.randn(1, 16, 4), ProjectorSignals(grid=(4, 4)))
    with pytest.raises(ValueError, match="frames"):
        method(torch.randn(1, 32, 4), ProjectorSignals(grid=(4, 4), state={"frames": 3}))


@torch.no_grad()
def test_runs_on_a_video_in_the_llava_host():
    """``images [B, T, 3, H, W]``: 3 frames of 4 x 4 patches, budget 12 -> 2 x 2 a frame."""
    torch.manual_seed(0)
    kwargs = {**DynamicVLM.test_configs["some"], "max_video_tokens": 12}
    host = LlavaHost(TINY).eval().apply(projector=DynamicVLM(**kwargs).eval())
    images, prefix, suffix, valid = llava_inputs()
    video = torch.stack([images, images.flip(-1), images.flip(-2)], 1)  # [3, 3, 3, 32, 32]
    logits, cache = host.prefill(video, prefix, suffix, valid)
    assert cache["layers"][0]["k"].shape[2] == 2 + 3 * 4 + 5
    assert host.last_state["frames"] == 3 and torch.isfinite(logits).all()
    image, _ = host.prefill(images, prefix, suffix, valid)
    assert image.shape == logits.shape


def test_batch_equals_alone_gradients_and_bf16():
    method = DynamicVLM(**DynamicVLM.test_configs["some"]).eval()
    x = torch.randn(3, 2 * 16, 32)
    s = ProjectorSignals(grid=(4, 4), state={"frames": 2})
    together = method(x, s)
    for i in range(3):
        torch.testing.assert_close(together[i], method(x[i : i + 1], s)[0])
    x.requires_grad_(True)
    method.train()(x, s).square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in method.parameters())
    out = method.eval().bfloat16()(x.detach().bfloat16(), s)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
