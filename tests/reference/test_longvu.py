"""LongVU: temporal frame selection, cross-modal resolution choice and spatial drop."""

from __future__ import annotations

import pytest
import torch

from reference.hosts.llava import TINY, LlavaHost
from reference.longvu import LongVU, fit_chunks, load_official, select_frames, spatial_keep
from reference.projector import ProjectorSignals
from tests.reference.fixtures import load, tensor

GOLDEN = load("longvu")
CASES = GOLDEN["cases"]


def tiny(case: dict, **overrides) -> LongVU:
    kwargs = dict(
        in_dim=4,
        out_dim=6,
        image_token_len=case["image_token_len"],
        lowres_token=case["lowres_token"],
        max_length=case["max_length"],
        dino_threshold=case["dino_threshold"],
        drop_threshold=case["drop_threshold"],
    )
    method = LongVU(**{**kwargs, **overrides}).eval()
    load_official(method, {f"model.{k}": tensor(v) for k, v in case["weights"].items()})
    return method


def signals(case: dict, **state) -> ProjectorSignals:
    base = {
        "frames": case["frames"],
        "frame_features": tensor(case["frame_features"]),
        "text": tensor(case["text"]),
        "prompt_len": case["prompt_len"],
    }
    return ProjectorSignals(grid=tuple(case["grid"]), state={**base, **state})


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_reproduces_the_official_golden_fixture(case):
    """The official ``prepare_inputs_labels_for_multimodal`` (SVA stubbed by the identity): the
    same visual tokens, in the same order, for each path (selection, mix, drop, cut, none)."""
    with torch.no_grad():
        out = tiny(case)(tensor(case["features"]), signals(case))
    torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)


PERTURB = [
    ("select-windows-then-mix", {"dino_threshold": 0.99}, {}),
    ("select-windows-then-mix", {"window": 8}, {}),
    ("select-windows-then-mix", {}, {"frame_features": None}),
    ("select-windows-then-mix", {}, {"prompt_len": 0}),
    ("spatial-drop", {"drop_threshold": 0.95}, {}),
    ("spatial-drop", {"chunk": 4}, {}),
    ("select-single-window-drop-truncate", {"inference_max_length": 8}, {}),
    ("interpolated-mix", {"lowres_token": 2}, {}),
]


@pytest.mark.parametrize(("name", "config", "state"), PERTURB)
def test_the_fixture_test_fails_when_an_option_is_perturbed(name, config, state):
    case = next(c for c in CASES if c["name"] == name)
    s = signals(case, **state)
    if "frame_features" in state:
        s.state.pop("frame_features")  # the SigLIP stand-in instead of the DINOv2 features
    with torch.no_grad():
        out = tiny(case, **config)(tensor(case["features"]), s)
    expected = tensor(case["out"])
    assert out.shape != expected.shape or not torch.allclose(out, expected, atol=1e-5)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """SVA width 1024 -> Qwen2-7B (3584): ``mm_projector`` and ``image_newline``, as counted on
    the official ``CambrianMetaModel`` (the SVA connector is not part of this module)."""
    with torch.device("meta"):
        count = sum(p.numel() for p in LongVU().parameters())
    assert count == GOLDEN["parameters_at_default"] == 16_525_824


def test_paper_token_counts():
    """144 + 12 newlines a high-resolution frame, 64 + 8 a low one, within 8192 - 16 - text."""
    method = LongVU(8, 8)
    assert method.num_tokens(576) == 12 * 13
    assert method.num_tokens(576, frames=40, prompt_len=100) == 40 * 156  # all fit: no mix
    many = method.num_tokens(576, frames=100, prompt_len=100)  # 100 low frames, some raised
    assert many == 100 * 72 + (8192 - 16 - 100 - 100 * 72) // (156 - 72) * (156 - 72)
    assert method.num_tokens(576, frames=200, prompt_len=100) == 8192 - 16 - 100  # cut


def test_temporal_windows_keep_the_middle_frame_and_drop_repeats():
    frames = torch.randn(1, 4, 3).repeat(32, 1, 1)  # a static video: every frame the same
    frames[20] = -frames[20]
    kept = select_frames(frames)  # windows [0, 16) and [16, 32)
    assert kept.tolist() == [8, 20, 24]  # the two middle frames and the frame that differs
    short = torch.randn(1, 4, 3).repeat(4, 1, 1)
    short[1] = -short[1]  # a mean over 4 frames: (1 - 1 + 1 + 1) / 4 = 0.5, below 0.83
    assert select_frames(short).tolist() == [0, 1, 2, 3]
    assert select_frames(torch.randn(900, 2, 2), max_frames=400).shape == (400,)


def test_spatial_drop_compares_with_the_chunks_first_frame():
    tokens = torch.randn(1, 5, 4).repeat(10, 1, 1)
    tokens[3, 2] = -tokens[3, 2]
    keep = spatial_keep(tokens, 0.8, chunk=8)
    assert keep[0].all() and keep[8].all()  # the first frame of each chunk is kept whole
    assert keep.sum() == 5 + 1 + 5 and keep[3, 2]
    index = fit_chunks(keep, budget=8, chunk=8)  # 11 kept, 2 chunks: 2 cut from each chunk end
    assert index.tolist() == [0, 1, 2, 3, 40, 41, 42]


def test_the_frame_nearest_the_text_gets_the_high_resolution():
    method = LongVU(4, 6, image_token_len=16, lowres_token=2, max_length=80).eval()
    x = torch.randn(6 * 16, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        low = method.project(x.view(6, 16, 4), (4, 4), 2)  # [6, 2 * 3, 6]
        high = method.project(x.view(6, 16, 4), (4, 4), 4)  # [6, 4 * 5, 6]
    for direction in (low[1] - low.mean(0), low[4] - low.mean(0)):
        text = direction.mean(0)[None, None] * 10  # [1, 1, 6]
        nearest = int((low @ text[0].T).mean((1, 2)).argmax())
        s = ProjectorSignals(grid=(4, 4), state={"frames": 6, "text": text, "prompt_len": 1})
        with torch.no_grad():
            out = method(x[None], s)[0]
        # budget 80 - 16 - 1 = 63: 6 low frames (36 tokens) and one raised (+14)
        assert out.shape[0] == 36 + 14
        start = 6 * nearest
        torch.testing.assert_close(out[start : start + 20], high[nearest])
        torch.testing.assert_close(out[:start], low[:nearest].flatten(0, 1))


def test_batch_equals_alone_and_marks_the_padding():
    case = CASES[1]
    method = tiny(case)
    x, s = tensor(case["features"]), signals(case)
    other = torch.randn_like(x)
    both = ProjectorSignals(
        grid=s.grid,
        state={
            **s.state,
            "frame_features": s.state["frame_features"].repeat(2, 1, 1),
            "text": s.state["text"].repeat(2, 1, 1),
        },
    )
    with torch.no_grad():
        out = method(torch.cat([x, other]), both)
        alone = method(other, ProjectorSignals(grid=s.grid, state=dict(s.state)))
    valid = both.state["projector_valid"]
    n0, n1 = valid.sum(1).tolist()
    assert n0 != n1  # a static video and a noisy one: different counts, the shorter padded
    torch.testing.assert_close(out[0, :n0], tensor(case["out"])[0])
    torch.testing.assert_close(out[1, :n1], alone[0])
    assert (out[valid.logical_not()] == 0).all()


def test_gradients_reach_the_projector_and_bfloat16_runs():
    case = CASES[0]
    method = tiny(case).train()
    x = tensor(case["features"]).requires_grad_(True)
    method(x, signals(case)).square().mean().backward()
    assert x.grad is not None and method.image_newline.grad is not None
    assert all(p.grad is not None for p in method.mm_projector.parameters())
    s = signals(case)
    s.state["text"] = s.state["text"].bfloat16()
    out = tiny(case).bfloat16()(tensor(case["features"]).bfloat16(), s)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_settings_the_paper_cannot_express_are_refused():
    with pytest.raises(ValueError, match="image_token_len"):
        LongVU(image_token_len=150)
    with pytest.raises(ValueError, match="lowres_token"):
        LongVU(lowres_token=13)  # above the 12 x 12 high resolution
    method = LongVU(4, 6, image_token_len=4, lowres_token=1)
    with pytest.raises(ValueError, match="frames"):
        method(torch.randn(1, 48, 4), ProjectorSignals(grid=(4, 4), state={"frames": 5}))
    short = LongVU(4, 6, image_token_len=16, lowres_token=2, max_length=60)
    with pytest.raises(ValueError, match="text"):  # the cross-modal query without a text
        short(torch.randn(1, 4 * 16, 4), ProjectorSignals(grid=(4, 4), state={"frames": 4}))


@pytest.mark.parametrize(("max_length", "count"), [(8192, 3 * 6), (36, 2 + 2 + 6)])
@torch.no_grad()
def test_runs_on_a_video_in_the_llava_host(max_length, count):
    """Three frames of 4 x 4 patches: all at 2 x 2 (+ newlines), or, with a short context
    (36 - 16 - 7 = 13 tokens), at 1 x 1 with the frame nearest the instruction raised."""
    torch.manual_seed(0)
    method = LongVU(
        TINY.vision["embed_dim"],
        TINY.hidden,
        image_token_len=4,
        lowres_token=1,
        max_length=max_length,
    )
    host = LlavaHost(TINY).eval().apply(projector=method.eval())
    video = torch.randn(1, 3, 3, 32, 32)
    prefix, suffix = torch.randint(0, TINY.vocab, (1, 2)), torch.randint(0, TINY.vocab, (1, 5))
    state = {"text": host.embed_tokens(suffix), "prompt_len": 7}
    logits, cache = host.prefill(video, prefix, suffix, torch.ones_like(suffix), state=state)
    assert logits.shape == (1, TINY.vocab) and host.last_state["frames"] == 3
    assert cache["layers"][0]["valid"].shape[1] == 2 + count + 5


@torch.no_grad()
def test_in_the_llava_host_samples_of_different_counts_equal_each_alone():
    """A still video (its frames alike) keeps fewer tokens than a moving one; the host
    masks the padded tail (``state["projector_valid"]``), so each sample gets its own."""
    torch.manual_seed(0)
    method = LongVU(
        TINY.vision["embed_dim"], TINY.hidden, image_token_len=4, lowres_token=1, max_length=30
    )
    host = LlavaHost(TINY).eval().apply(projector=method.eval())
    still = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1)
    video = torch.stack([still, torch.randn(4, 3, 32, 32)])  # [2, 4, 3, 32, 32]
    prefix, suffix = torch.randint(0, TINY.vocab, (2, 2)), torch.randint(0, TINY.vocab, (2, 5))
    valid = torch.ones_like(suffix)
    state = {"text": host.embed_tokens(suffix), "prompt_len": 7}
    both, _ = host.prefill(video, prefix, suffix, valid, state=state)
    counts = host.last_state["projector_valid"].sum(1).tolist()
    assert counts[0] < counts[1]  # the still video dropped frames
    for i in range(2):
        alone_state = {"text": state["text"][i : i + 1], "prompt_len": 7}
        one = slice(i, i + 1)
        alone, _ = host.prefill(video[one], prefix[one], suffix[one], valid[one], state=alone_state)
        torch.testing.assert_close(both[i : i + 1], alone, atol=1e-5, rtol=1e-5)
