"""TC-LLaVA (provisional): MLP, then average pooling of the video; the LLM hook's mask and ids."""

from __future__ import annotations

import pytest
import torch

from reference.hosts.llava import TINY, LlavaHost
from reference.projector import ProjectorSignals
from reference.tc_llava import TCLLaVA, frame_block_causal_mask, temporal_positions
from tests.reference.conftest import assert_cached_decoding_matches, llava_inputs


def small(**kwargs) -> TCLLaVA:
    torch.manual_seed(0)
    return TCLLaVA(**{**TCLLaVA.test_configs["some"], **kwargs}).eval()


def video(b: int, frames: int, n: int = 16, c: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, frames * n, c, generator=g)
    return x, ProjectorSignals(grid=(4, 4), state={"frames": frames})


def test_is_marked_provisional():
    assert TCLLaVA.basis.startswith("paper (provisional)")


def test_sixteen_frames_of_576_patches_become_16_x_144_tokens():
    method = TCLLaVA(16, 32).eval()
    x = torch.randn(1, 16 * 576, 16)
    with torch.no_grad():
        out = method(x, ProjectorSignals(grid=(24, 24), state={"frames": 16}))
    assert out.shape == (1, 16 * 144, 32) and method.num_tokens(16 * 576, 16) == 16 * 144


@pytest.mark.parametrize("keep", [64, 144])
def test_count_setting_reaches_the_bench_budgets(keep):
    method = TCLLaVA(16, 32, **TCLLaVA.count_setting(keep, 576))
    assert method.num_tokens(576) == keep
    assert TCLLaVA.count_setting(60, 576) is None  # no square pool gives 60


def test_parameter_count_is_llava_16_7b_projector():
    """linear_1 1024 -> 4096 and linear_2 4096 -> 4096 (PLLaVA-7B's projector; guessed base)."""
    with torch.device("meta"):
        assert sum(p.numel() for p in TCLLaVA().parameters()) == 20_979_712


@pytest.mark.parametrize("frames", [2, 8])
def test_each_token_is_the_mean_of_its_block_of_projected_patches(frames):
    """Tokens ``(t, i, j)``: the MLP's outputs averaged over a 2 x 2 block of patches and, with
    8 frames into a window of 4, over 2 consecutive frames."""
    method = small()
    x, signals = video(2, frames)
    with torch.no_grad():
        out = method(x, signals)
        y = method.linear_2(method.act(method.linear_1(x)))
    k = frames // method.out_frames(frames)
    y = y.reshape(2, frames // k, k, 2, 2, 2, 2, 64)  # b (t kt) (i ki) (j kj) d
    want = y.mean(dim=(2, 4, 6)).flatten(1, 3)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert out.shape[1] == method.num_tokens(x.shape[1], frames)


def test_a_video_batch_equals_each_video_alone():
    method = small()
    x, signals = video(3, 4)
    with torch.no_grad():
        together = method(x, signals)
        for i in range(3):
            torch.testing.assert_close(together[i], method(x[i : i + 1], signals)[0])


def test_gradients_reach_the_mlp_and_bf16_runs():
    method = small().train()
    x, signals = video(2, 4)
    x.requires_grad_(True)
    method(x, signals).square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in method.parameters())
    out = small().to(torch.bfloat16)(x.detach().to(torch.bfloat16), signals)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_frames_the_window_cannot_divide_and_oversized_pools_are_refused():
    method = small()
    with pytest.raises(ValueError, match=r"^frames must"):
        method(*video(1, 6))  # 6 frames into a window of 4
    with pytest.raises(ValueError, match=r"^pool_shape must"):
        small(pool_shape=(5, 5))(*video(1, 2))
    assert method.num_tokens(3 * 16, 3) == 3 * 4  # fewer frames than the window: all kept


def test_frame_block_causal_mask():
    """Prefix 1, two frames of 2 tokens, suffix 1: a frame's tokens see each other and every
    earlier token; text is causal; nothing sees a later frame."""
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(frame_block_causal_mask(1, 2, 2, 1), want)


def test_temporal_positions_share_one_id_per_frame():
    assert temporal_positions(2, 3, 2, 2).tolist() == [0, 1, 2, 2, 3, 3, 4, 4, 5, 6]


@torch.no_grad()
def test_a_video_in_the_llava_host_gives_4_tokens_a_frame_and_a_consistent_cache():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(projector=small())
    images, prefix, suffix, valid = llava_inputs()
    clips = torch.randn(images.shape[0], 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    keys = assert_cached_decoding_matches(host, clips, prefix, suffix, valid)
    assert keys == 2 + 4 * 4 + 5
