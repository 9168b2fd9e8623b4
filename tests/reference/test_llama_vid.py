"""LLaMA-VID: a text-guided context token and a pooled content token per frame."""

from __future__ import annotations

import pytest
import torch

from reference.llama_vid import LlamaVid, load_official
from reference.projector import ProjectorSignals
from tests.reference.fixtures import load, tensor

GOLDEN = load("llama_vid")


def tiny(case: dict, **overrides) -> LlamaVid:
    bert = GOLDEN["bert"]
    kwargs = dict(
        in_dim=GOLDEN["in_dim"],
        out_dim=GOLDEN["out_dim"],
        num_query=case["num_query"],
        compress_type=case["compress_type"],
        att_feat_size=case["att_feat_size"],
        hidden_size=bert["hidden_size"],
        num_hidden_layers=bert["num_hidden_layers"],
        num_attention_heads=bert["num_attention_heads"],
        intermediate_size=bert["intermediate_size"],
        vocab_size=bert["vocab_size"] + 1,  # the official init_bert adds [DEC]
        max_position_embeddings=bert["max_position_embeddings"],
    )
    method = LlamaVid(**{**kwargs, **overrides}).eval()
    weights = GOLDEN["weights"][str(case["att_feat_size"])]
    load_official(method, {k: tensor(v) for k, v in weights.items()})
    return method


def padded(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and their mask, as a tokenizer pads a batch."""
    n = max(map(len, ids))
    out = torch.zeros(len(ids), n, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return out, mask


def signals(case: dict) -> ProjectorSignals:
    ids, mask = padded(case["text_ids"])
    state = {"text": ids, "text_mask": mask, "frames": case["frames"]}
    return ProjectorSignals(grid=(4, 4), state=state)


def small(compress_type: str | None = "mean") -> LlamaVid:
    return LlamaVid(
        8,
        8,
        num_query=2,
        compress_type=compress_type,
        att_feat_size=8,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        vocab_size=0,
    )


CASES = GOLDEN["cases"]
IDS = [f"{c['kind']}-{c['compress_type']}-T{c['frames']}-w{c['att_feat_size']}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reproduces_the_official_golden_fixture(case):
    """The official ``vlm_attention`` with the same weights (loaded by their checkpoint names):
    same tokens, a batch with padded questions included."""
    method = tiny(case)
    with torch.no_grad():
        out = method(tensor(case["features"]), signals(case))
    torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["content", "text_mask", "cls", "text_positions"])
def test_the_fixture_test_fails_when_an_option_is_perturbed(change):
    case = CASES[0]  # two samples, the first question padded
    method = tiny(case, compress_type=None) if change == "content" else tiny(case)
    x, s = tensor(case["features"]), signals(case)
    if change == "text_mask":
        s.state.pop("text_mask")
    if change == "cls":
        x = x[:, 1:]
    if change == "text_positions":
        method.vlm_att_encoder.bert.embeddings.position_embeddings.weight.data.zero_()
    with torch.no_grad():
        out = method(x, s)
    expected = tensor(case["out"])
    assert out.shape != expected.shape or not torch.allclose(out, expected, atol=1e-5)


def test_embedded_text_equals_token_ids():
    """``state["text"]`` as word embeddings gives what the token ids give."""
    case = CASES[0]
    method = tiny(case)
    s = signals(case)
    table = method.vlm_att_encoder.bert.embeddings.word_embeddings
    embedded = ProjectorSignals(grid=s.grid, state={**s.state, "text": table(s.state["text"])})
    with torch.no_grad():
        x = tensor(case["features"])
        torch.testing.assert_close(method(x, embedded), method(x, s))


def test_the_cls_of_a_single_image_may_come_from_the_hosts_layers():
    case = CASES[0]
    method, x = tiny(case), tensor(case["features"])  # [B, 17, C]: CLS first
    s = signals(case)
    host = ProjectorSignals(layers=(x,), grid=(4, 4), state=s.state)
    with torch.no_grad():
        torch.testing.assert_close(method(x[:, 1:], host), method(x, s))


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """EVA ViT-g (1408) -> Vicuna-7B (4096), BERT-base Q-Former with 32 queries, mean content
    token (the video model's scripts), as counted on the official modules."""
    count = sum(p.numel() for p in LlamaVid().parameters())
    assert count == GOLDEN["parameters_at_default"] == 217_078_016


def test_a_frame_is_two_tokens_and_a_video_two_per_frame():
    method = LlamaVid(
        64,
        48,
        num_query=4,
        att_feat_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
    ).eval()
    text = torch.randint(1, 50, (2, 7))
    image = method(torch.randn(2, 256, 64), ProjectorSignals(grid=(16, 16), state={"text": text}))
    assert image.shape == (2, 2, 48) and method.num_tokens(256) == 2
    state = {"text": text, "frames": 8}
    video = method(torch.randn(2, 8 * 257, 64), ProjectorSignals(grid=(16, 16), state=state))
    assert video.shape == (2, 16, 48) and method.num_tokens(8 * 256, frames=8) == 16


def test_frames_are_encoded_independently_in_order():
    """Frame t's two tokens depend on frame t alone (the same question for every frame)."""
    method = tiny(CASES[1])
    s = signals(CASES[1])
    x = tensor(CASES[1]["features"])  # [2, 3 * 17, C]
    with torch.no_grad():
        video = method(x, s)
        for t in range(3):
            one = ProjectorSignals(grid=(4, 4), state={**s.state, "frames": 1})
            frame = method(x[:, t * 17 : (t + 1) * 17], one)
            torch.testing.assert_close(video[:, 2 * t : 2 * t + 2], frame)


def test_the_released_grid_and_full_settings_token_counts():
    """``grid:4`` on a 224 px EVA grid (16 x 16) and ``None`` at 336 px (24 x 24)."""
    assert small("grid:4").num_tokens(256) == 1 + 16
    assert small("grid:2").num_tokens(4 * 256, frames=4) == 4 * (1 + 4)
    assert small(None).num_tokens(576) == 1 + 576
    out = small("grid:4")(torch.randn(1, 257, 8), ProjectorSignals(grid=(16, 16)))
    assert out.shape == (1, 17, 8)


def test_grid_content_tokens_count():
    method = small("grid:2")
    out = method(torch.randn(1, 36, 8), ProjectorSignals(grid=(6, 6)))
    assert out.shape == (1, 1 + 4, 8) and method.num_tokens(36) == 5


def test_settings_the_paper_cannot_express_are_refused():
    with pytest.raises(ValueError, match="compress_type"):
        LlamaVid(compress_type="grid:1")
    method = small("grid:4")
    with pytest.raises(ValueError, match="compress_type"):
        method(torch.randn(1, 9, 8), ProjectorSignals(grid=(3, 3)))
    with pytest.raises(ValueError, match="frames"):
        method(torch.randn(1, 32, 8), ProjectorSignals(grid=(4, 4), state={"frames": 3}))
