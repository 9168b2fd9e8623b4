"""Video in the LLaVA host: ``prefill(images [B, T, 3, H, W])``."""

from __future__ import annotations

import torch

from reference.hosts.llava import TINY, LlavaHost
from reference.llama_vid import LlamaVid
from reference.projector import Projector, ProjectorSignals
from reference.tome import ToMe
from tests.reference.conftest import assert_cached_decoding_matches, llava_inputs

T, N = 2, 16  # frames; TINY's patches per frame


def host() -> LlavaHost:
    torch.manual_seed(0)
    return LlavaHost(TINY).eval()


def video(frames: int = T, dtype=torch.float32):
    images, prefix, suffix, valid = llava_inputs(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    clips = torch.randn(images.shape[0], frames, 3, 32, 32, generator=g).to(dtype)
    return clips, prefix, suffix, valid


def llama_vid() -> LlamaVid:
    torch.manual_seed(0)
    return LlamaVid(**LlamaVid.test_configs["some"]).eval()


class Spy(Projector):
    """The MLP-free identity projector that records what the host gives it."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 64)
        self.seen = []

    def forward(self, features, signals):
        self.seen.append((features, signals))
        return self.proj(features[:, ::4])

    def num_tokens(self, n):
        return n // 4


@torch.no_grad()
def test_llama_vid_runs_on_a_video_in_the_host_two_tokens_a_frame():
    model = host().apply(projector=llama_vid())
    clips, prefix, suffix, valid = video()
    _, cache = model.prefill(clips, prefix, suffix, valid)
    assert cache["layers"][0]["valid"].shape[1] == 2 + T * 2 + 5
    assert model.last_state["frames"] == T
    assert_cached_decoding_matches(model, clips, prefix, suffix, valid)


@torch.no_grad()
def test_llama_vid_in_the_host_equals_llama_vid_on_each_frame_alone():
    """The host hands the projector every frame's patches, frame after frame, and every
    frame's CLS in ``layers`` (LLaMA-VID's Q-Former sees each frame's CLS and patches)."""
    spy, method = Spy(), llama_vid()
    clips = video()[0]
    got, _ = host().apply(projector=method).encode_images(clips, {})
    host().apply(projector=spy).encode_images(clips.flatten(0, 1), {})
    features, signals = spy.seen[0]
    patches = features.unflatten(0, (3, T))  # [B, T, N, C_v]
    layers = signals.layers[-1].unflatten(0, (3, T))  # [B, T, 1 + N, C_v]
    frames = [
        method(patches[:, t], ProjectorSignals(layers=(layers[:, t],), grid=(4, 4)))
        for t in range(T)
    ]
    torch.testing.assert_close(got, torch.cat(frames, 1), rtol=1e-5, atol=1e-6)
    no_cls = method(patches[:, 0], ProjectorSignals(grid=(4, 4)))
    assert not torch.allclose(frames[0], no_cls)  # the CLS counts


@torch.no_grad()
def test_a_one_frame_video_equals_the_image():
    clips, prefix, suffix, valid = video(frames=1)
    for kwargs in ({}, {"vision": ToMe(r=6)}, {"projector": llama_vid()}):
        model = host().apply(**kwargs)
        image, _ = model.prefill(clips[:, 0], prefix, suffix, valid)
        clip, _ = model.prefill(clips, prefix, suffix, valid)
        torch.testing.assert_close(clip, image)


@torch.no_grad()
def test_two_frames_give_one_run_of_every_frames_tokens_in_order():
    model = host()
    clips, prefix, suffix, valid = video()
    vis, _ = model.encode_images(clips, {})
    assert vis.shape == (3, T * N, TINY.hidden)
    for t in range(T):
        frame, _ = model.encode_images(clips[:, t], {})
        torch.testing.assert_close(vis[:, t * N : (t + 1) * N], frame)
    _, cache = model.prefill(clips, prefix, suffix, valid)
    assert cache["layers"][0]["valid"].shape[1] == 2 + T * N + 5
    assert_cached_decoding_matches(model, clips, prefix, suffix, valid)


@torch.no_grad()
def test_a_projector_gets_frame_major_features_one_frames_grid_and_frame_major_layers():
    spy = Spy()
    model = host().apply(projector=spy)
    clips, prefix, suffix, valid = video()
    model.prefill(clips, prefix, suffix, valid)
    ((features, signals),) = spy.seen
    assert features.shape == (3, T * N, 32) and signals.grid == (4, 4)
    assert signals.state["frames"] == T
    assert len(signals.layers) == TINY.vision_layer + 1
    assert all(y.shape == (3, T * (1 + N), 32) for y in signals.layers)
    torch.testing.assert_close(features[:, N:], signals.layers[-1][:, N + 2 :])  # frame 2's patches
    image_spy = Spy()
    host().apply(projector=image_spy).prefill(clips[:, 1], prefix, suffix, valid)
    ((image_features, image_signals),) = image_spy.seen
    torch.testing.assert_close(features[:, N:], image_features)
    torch.testing.assert_close(signals.layers[0][:, 1 + N :], image_signals.layers[0])
    assert "frames" not in image_signals.state


@torch.no_grad()
def test_a_vision_reducer_runs_per_frame():
    model = host().apply(vision=ToMe(r=6))
    clips, prefix, suffix, valid = video()
    vis, _ = model.encode_images(clips, {})
    assert vis.shape[1] == T * (N - 6)
    second, _ = model.encode_images(clips[:, 1], {})
    torch.testing.assert_close(vis[:, N - 6 :], second)
    assert_cached_decoding_matches(model, clips, prefix, suffix, valid)


@torch.no_grad()
def test_each_sample_of_a_video_batch_gets_what_it_gets_alone():
    clips, prefix, suffix, valid = video()
    for kwargs in ({}, {"projector": llama_vid()}):
        model = host().apply(**kwargs)
        together, _ = model.prefill(clips, prefix, suffix, valid)
        for i in range(3):
            n = int(valid[i].sum())
            alone, _ = model.prefill(
                clips[i : i + 1], prefix[i : i + 1], suffix[i : i + 1, :n], valid[i : i + 1, :n]
            )
            torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)


def test_a_video_runs_in_bfloat16_and_gradients_reach_the_projector():
    model = host().apply(projector=llama_vid()).to(torch.bfloat16)
    clips, prefix, suffix, valid = video(dtype=torch.bfloat16)
    logits, _ = model.prefill(clips, prefix, suffix, valid)
    assert torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert model.projector.vlm_att_val_projector.weight.grad.abs().sum() > 0
