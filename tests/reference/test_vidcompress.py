"""VidCompress (provisional): memory-enhanced clip compressor + text-perceived Q-Former."""

from __future__ import annotations

import pytest
import torch

from reference.hosts.llava import TINY, LlavaHost
from reference.projector import ProjectorSignals
from reference.vidcompress import VidCompress, pool_frames

N, GRID, C = 16, (4, 4), 8


def small(**kwargs) -> VidCompress:
    config = dict(
        in_dim=C,
        out_dim=6,
        num_query=3,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        text_dim=5,
        clip_len=2,
        memory_clips=1,
        memory_heads=2,
    )
    torch.manual_seed(0)
    return VidCompress(**(config | kwargs)).eval()


def video(b: int = 2, frames: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, frames * N, C, generator=torch.Generator().manual_seed(seed))


def signals(frames: int = 6, text=None, mask=None) -> ProjectorSignals:
    state = {"frames": frames}
    if text is not None:
        state["text"] = text
    if mask is not None:
        state["text_mask"] = mask
    return ProjectorSignals(grid=GRID, state=state)


@torch.no_grad()
def test_num_query_tokens_per_frame_frame_after_frame():
    method = small()
    out = method(video(), signals())
    assert out.shape == (2, 6 * 3, 6) and method.num_tokens(6 * N, frames=6) == 18
    assert small(num_query=32).num_tokens(32 * 256, frames=32) == 32 * 32  # 32 frames of EVA


@torch.no_grad()
def test_the_cache_carries_the_past_and_never_the_future():
    """Clip k's tokens depend on clip k - 1 (through the cache) and not on clip k + 1; without a
    cache, clips are independent."""
    x = video(b=1)
    changed_past, changed_future = x.clone(), x.clone()
    changed_past[:, : 2 * N] += torch.randn(1, 2 * N, C)  # clip 0
    changed_future[:, 4 * N :] += torch.randn(1, 2 * N, C)  # clip 2
    for memory_clips, past_matters in ((1, True), (0, False)):
        method = small(memory_clips=memory_clips)
        clip1 = slice(2 * 3, 4 * 3)  # clip 1's frames: 2 and 3
        base = method(x, signals())[:, clip1]
        assert torch.equal(method(changed_future, signals())[:, clip1], base)
        past = method(changed_past, signals())[:, clip1]
        assert (not torch.allclose(past, base)) is past_matters


@torch.no_grad()
def test_the_cache_holds_only_the_last_memory_clips():
    x = video(b=1, frames=8)
    changed = x.clone()
    changed[:, : 2 * N] += torch.randn(1, 2 * N, C)  # clip 0 of 4
    method = small(memory_clips=1)
    last = slice(3 * 2 * 3, 4 * 2 * 3)  # clip 3 sees clip 2 only; clip 2 saw clip 1 only
    assert torch.allclose(method(changed, signals(8))[:, last], method(x, signals(8))[:, last])


@torch.no_grad()
def test_the_question_changes_the_tokens_and_its_padding_does_not():
    method = small()
    x = video(b=1)
    text = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(1))
    plain, with_text = method(x, signals()), method(x, signals(text=text))
    assert not torch.allclose(plain, with_text)
    padded = torch.cat([text, torch.randn(1, 2, 5)], dim=1)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    torch.testing.assert_close(method(x, signals(text=padded, mask=mask)), with_text)


@torch.no_grad()
def test_batch_equals_alone():
    method = small()
    x = video(b=3)
    text = torch.randn(3, 4, 5)
    together = method(x, signals(text=text))
    for i in range(3):
        alone = method(x[i : i + 1], signals(text=text[i : i + 1]))
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter_and_bfloat16_runs():
    method = small().train()
    x = video().requires_grad_(True)
    method(x, signals(text=torch.randn(2, 3, 5))).square().mean().backward()
    assert x.grad is not None
    for name, p in method.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
    out = small().bfloat16()(video().bfloat16(), signals(text=torch.randn(2, 3, 5).bfloat16()))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_the_multiscale_stage_pools_each_frame():
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(1, 2 * 16, 1)  # two 4 x 4 frames
    pooled = pool_frames(x, (4, 4), 2)
    assert pooled.shape == (1, 2 * 4, 1)
    assert pooled[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5, 18.5, 20.5, 26.5, 28.5]


def test_settings_the_paper_cannot_express_are_refused():
    method = small()
    with pytest.raises(ValueError, match="frames must be a multiple of clip_len"):
        method(video(frames=5), signals(5))
    image = method(video(frames=1), ProjectorSignals(grid=GRID))  # an image: one frame
    assert image.shape == (2, 3, 6)
    with pytest.raises(ValueError, match="num_query"):
        small(num_query=17)(video(), signals())
    with pytest.raises(ValueError, match="pool"):
        small(pool=3)(video(), signals())
    with pytest.raises(ValueError, match="clip_len"):
        VidCompress(clip_len=0)


def test_parameter_count_at_the_guessed_default():
    """No official module to count: this pins our default (EVA ViT-g 1408 -> Vicuna-7B 4096,
    BERT-base Q-Former, two 1408-wide compressor blocks), so a change to it is deliberate."""
    with torch.device("meta"):
        count = sum(p.numel() for p in VidCompress().parameters())
    assert count == 219_111_680


@torch.no_grad()
def test_runs_on_a_video_in_the_llava_host():
    torch.manual_seed(0)
    method = VidCompress(
        TINY.vision["embed_dim"],
        TINY.hidden,
        num_query=2,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        text_dim=TINY.hidden,
        clip_len=2,
        memory_heads=2,
    )
    host = LlavaHost(TINY).eval().apply(projector=method.eval())
    videos = torch.randn(2, 4, 3, 32, 32)
    prefix = torch.randint(0, TINY.vocab, (2, 2))
    suffix = torch.randint(0, TINY.vocab, (2, 5))
    state = {"text": host.embed_tokens(suffix)}
    logits, cache = host.prefill(videos, prefix, suffix, torch.ones_like(suffix), state=state)
    assert cache["layers"][0]["valid"].shape[1] == 2 + 4 * 2 + 5
    for i in range(2):
        one = {"text": state["text"][i : i + 1]}
        alone, _ = host.prefill(
            videos[i : i + 1], prefix[i : i + 1], suffix[i : i + 1], torch.ones(1, 5), state=one
        )
        torch.testing.assert_close(logits[i : i + 1], alone, rtol=1e-4, atol=1e-5)
