"""PVC (provisional, from the paper): progressive encoding across frames, 64 tokens a frame."""

from __future__ import annotations

import pytest
import torch

from reference.hosts.llava import TINY, LlavaHost
from reference.hosts.vit import HostState, VisionTransformer
from reference.internvl_1_5 import InternVL15
from reference.projector import ProjectorSignals
from reference.pvc import PVC, ProgressiveEncoding, causal_temporal_attention
from tests.reference.conftest import assert_cached_decoding_matches, llava_inputs

L = 2  # progressive layers of the tiny ViT (depth 3)


def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**TINY.vision).eval()


def encoding(trained: bool = True, seed: int = 1) -> ProgressiveEncoding:
    """The tiny ViT's encoding; ``trained``: random AdaLN weights in place of the zero init."""
    torch.manual_seed(seed)
    enc = ProgressiveEncoding(dim=32, num_heads=4, num_layers=L).eval()
    if trained:
        for layer in enc.layers:
            torch.nn.init.normal_(layer.adaLN_modulation[1].weight, std=0.05)
            torch.nn.init.normal_(layer.adaLN_modulation[1].bias, std=0.3)
    return enc


def clips(b: int = 2, t: int = 4, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, t, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def encode(model: VisionTransformer, video: torch.Tensor, enc=None, timestamps=None):
    """The ViT's last block output ``[B * T, 1 + N, C]`` (no final norm); ``enc`` runs the
    last ``L`` blocks with progressive encoding."""
    t = video.shape[1]
    x = model.patch_embed(video.flatten(0, 1))
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], 1) + model.pos_embed
    ctx = HostState(x, 1, proportional=False)
    for block in model.blocks[:-L]:
        x = block(x, ctx)
    if enc is None:
        for block in model.blocks[-L:]:
            x = block(x, ctx)
        return x
    return enc(x, list(model.blocks[-L:]), t, timestamps)


def test_is_marked_provisional():
    assert PVC.basis.startswith("paper (provisional)")


def test_an_image_at_448px_becomes_4_frames_of_64_tokens():
    """InternViT at 448 px / 14 px patches: 32 x 32 patches; the static video of 4 copies."""
    torch.manual_seed(0)
    method = PVC(8, 16).eval()
    assert method.num_tokens(1024) == 4 * 64
    x = torch.randn(2, 1024, 8)
    with torch.no_grad():
        out = method(x, ProjectorSignals(grid=(32, 32)))
        one = InternVL15(8, 16, downsample_ratio=0.25, ps_version="v2")
        one.load_state_dict(method.state_dict())
        frame = one(x, ProjectorSignals(grid=(32, 32)))
    assert out.shape == (2, 256, 16) and frame.shape == (2, 64, 16)
    torch.testing.assert_close(out, frame.repeat(1, 4, 1))


def test_a_video_gives_64_tokens_a_frame_each_compressed_alone():
    torch.manual_seed(0)
    method = PVC(8, 16).eval()
    x = torch.randn(2, 3 * 1024, 8)
    with torch.no_grad():
        out = method(x, ProjectorSignals(grid=(32, 32), state={"frames": 3}))
        alone = [method(f, ProjectorSignals(grid=(32, 32)))[:, :64] for f in x.chunk(3, dim=1)]
    assert out.shape == (2, 3 * 64, 16) and method.num_tokens(3 * 1024, frames=3) == 192
    torch.testing.assert_close(out, torch.cat(alone, 1))


def test_the_video_batch_equals_each_sample_alone():
    torch.manual_seed(0)
    method = PVC(**PVC.test_configs["some"]).eval()
    x, signals = torch.randn(3, 2 * 16, 32), ProjectorSignals(grid=(4, 4), state={"frames": 2})
    with torch.no_grad():
        together = method(x, signals)
        alone = torch.cat([method(x[i : i + 1], signals) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_frames_that_do_not_divide_the_tokens_are_refused():
    method = PVC(**PVC.test_configs["some"])
    with pytest.raises(ValueError, match=r"^frames must divide"):
        method(torch.randn(1, 40, 32), ProjectorSignals(grid=(4, 4), state={"frames": 3}))
    with pytest.raises(ValueError, match=r"^image_frames must be"):
        PVC(32, 64, image_frames=0)
    with pytest.raises(ValueError, match=r"^num_layers must be"):
        ProgressiveEncoding(32, 4, num_layers=0)


def test_parameter_counts_at_internvl2_8b_widths_are_pinned_ours_not_official():
    """InternViT-300M (1024, 16 heads) -> InternLM2.5-7B (4096). Ours, not official counts:
    the official model code could not be read. At ratio 1/2 ``mlp1`` is InternVL2-8B's own."""
    with torch.device("meta"):
        count = sum(p.numel() for p in PVC().parameters())
        encoder = sum(p.numel() for p in ProgressiveEncoding().parameters())
        internvl2 = sum(p.numel() for p in PVC(downsample_ratio=0.5).parameters())
    assert count == 83_927_040  # LayerNorm + Linear(16 * 1024, 4096) + Linear(4096, 4096)
    assert encoder == 47_495_168  # TE + 4 x (T-MHA + adaLN_modulation)
    assert internvl2 == 33_570_816


def test_the_benchmark_budgets_are_reached_at_the_llava_15_shape():
    for keep, ratio in ((64, 1 / 6), (144, 1 / 4)):
        setting = PVC.count_setting(keep, 576)
        assert setting == {"downsample_ratio": pytest.approx(ratio)}
        with torch.device("meta"):
            assert PVC(**setting).num_tokens(576) == keep
    assert PVC.count_setting(100, 576) is None


@torch.no_grad()
def test_an_untrained_progressive_encoding_leaves_the_vit_unchanged():
    model, video = vit(), clips()
    plain = model.forward_features(video.flatten(0, 1))
    got = encode(model, video, encoding(trained=False))
    torch.testing.assert_close(model.norm(got), plain, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_t_mha_is_causal_over_frames():
    model, enc, video = vit(), encoding(), clips()
    out = encode(model, video, enc).unflatten(0, (2, 4))
    changed = video.clone()
    changed[:, 2] += 1.0
    moved = encode(model, changed, enc).unflatten(0, (2, 4))
    torch.testing.assert_close(moved[:, :2], out[:, :2])  # earlier frames never see frame 2
    assert not torch.allclose(moved[:, 3], out[:, 3], atol=1e-4)  # later frames do


def test_the_temporal_attention_core_attends_the_same_position_in_earlier_frames():
    v = torch.randn(1, 3, 5, 4)
    qkv = torch.cat([torch.zeros(1, 3, 5, 8), v], -1)  # equal scores: the mean of frames 0..t
    out = causal_temporal_attention(qkv, heads=1)
    expected = v.cumsum(1) / torch.arange(1, 4).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)


@torch.no_grad()
def test_a_static_videos_copies_encode_differently_once_trained():
    model, enc = vit(), encoding()
    image = clips(b=1, t=1)
    out = encode(model, image.expand(-1, 4, -1, -1, -1), enc)
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    timed = encode(model, image.expand(-1, 4, -1, -1, -1), enc, torch.tensor([[0, 2, 4, 6]]))
    torch.testing.assert_close(timed[0], out[0])  # frame 0 sees only itself, at time 0
    assert not torch.allclose(timed[1], out[1], atol=1e-4)


@torch.no_grad()
def test_the_encoding_batch_equals_each_sample_alone():
    model, enc, video = vit(), encoding(), clips(b=2, t=3)
    together = encode(model, video, enc).unflatten(0, (2, 3))
    for i in range(2):
        alone = encode(model, video[i : i + 1], enc)
        torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_new_parameter():
    model = vit()
    untrained = encoding(trained=False).train()
    encode(model, clips(), untrained).square().mean().backward()
    for layer in untrained.layers:  # the zero init still lets the modulation learn
        assert layer.adaLN_modulation[1].weight.grad.abs().sum() > 0
    enc = encoding().train()
    encode(model, clips(), enc).square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_internvit_layers_keep_their_layer_scales():
    """An InternViT-style layer (``attn(x)`` returns a tensor, ``ls1`` / ``ls2``) runs as it is
    when the encoding is untrained."""

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)
            self.attn, self.mlp = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
            self.ls1, self.ls2 = (
                torch.nn.Parameter(torch.rand(8)),
                torch.nn.Parameter(torch.rand(8)),
            )

    torch.manual_seed(0)
    layer, x = Layer(), torch.randn(6, 5, 8)
    y = x + layer.attn(layer.norm1(x)) * layer.ls1
    y = y + layer.mlp(layer.norm2(y)) * layer.ls2
    got = ProgressiveEncoding(8, 2, num_layers=1)(x, [layer], frames=3)
    torch.testing.assert_close(got, y)


def test_bfloat16():
    model, enc = vit().to(torch.bfloat16), encoding().to(torch.bfloat16)
    with torch.no_grad():
        x = encode(model, clips(t=2).to(torch.bfloat16), enc)[:, 1:].reshape(2, 2 * 16, 32)
        method = PVC(**PVC.test_configs["some"]).to(torch.bfloat16)
        out = method(x, ProjectorSignals(grid=(4, 4), state={"frames": 2}))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 2, 64)
    assert torch.isfinite(out.float()).all()


@torch.no_grad()
def test_runs_on_images_and_videos_in_the_llava_host():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(projector=PVC(32, 64, downsample_ratio=0.5))
    images, prefix, suffix, valid = llava_inputs()
    assert assert_cached_decoding_matches(host, images, prefix, suffix, valid) == 2 + 4 * 4 + 5
    video = clips(b=3, t=2)
    _, cache = host.prefill(video, prefix, suffix, valid)
    assert cache["layers"][0]["valid"].shape[1] == 2 + 2 * 4 + 5
    assert host.last_state["frames"] == 2
    assert_cached_decoding_matches(host, video, prefix, suffix, valid)
