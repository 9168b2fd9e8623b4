"""LLaVA-Mini: pre-fusion of the vision into the text, and C x C vision tokens per image/frame."""

from __future__ import annotations

import pytest
import torch

from reference.hosts.llava import TINY, LlavaHost
from reference.llava_mini import LlavaMini, load_official, prefusion
from reference.projector import ProjectorSignals
from tests.reference.conftest import llava_inputs
from tests.reference.fixtures import load, tensor

GOLDEN = load("llava_mini")
IMAGE_TOKEN_INDEX = -200
CASES = GOLDEN["cases"]
IDS = [f"c{c['compressor_size']}-T{c['frames']}" for c in CASES]


def tiny(compressor_size: int, **overrides) -> LlavaMini:
    t = GOLDEN["tiny"]
    kwargs = dict(
        in_dim=t["in_dim"],
        out_dim=t["out_dim"],
        compressor_size=compressor_size,
        compressor_heads=t["compressor_heads"],
        prefusion_layer_num=t["prefusion_layer_num"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        intermediate_size=t["intermediate_size"],
    )
    method = LlavaMini(**{**kwargs, **overrides}).eval()
    weights = {**GOLDEN["weights"], **GOLDEN["compressor_weights"][str(compressor_size)]}
    load_official(method, {k: tensor(v) for k, v in weights.items()})
    return method


def run(method: LlavaMini, case: dict, **state) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The method on a fixture case, the prompt embedded as the official embeds it (ids clamped
    at 0; padding and the image placeholder, ids <= 0, masked)."""
    ids = torch.tensor(case["input_ids"])
    table = torch.nn.Embedding.from_pretrained(tensor(GOLDEN["embed_tokens"]))
    x = torch.as_tensor(case["x"])  # [B, N, C] or [B, T, N, C]
    frames = 1 if case["frames"] is None else case["frames"]
    state = {"text_embeds": table(ids.clamp(min=0)), "text_mask": ids > 0, **state}
    if frames > 1:
        state["frames"] = frames
    s = ProjectorSignals(grid=tuple(GOLDEN["tiny"]["grid"]), state=state)
    with torch.no_grad():
        tokens = method(x.reshape(x.shape[0], -1, x.shape[-1]), s)
    return tokens, s.state["fused_text"], s.state


def splice(ids: torch.Tensor, valid: torch.Tensor, fused: torch.Tensor, tokens: torch.Tensor):
    """What a host does with the outputs (the official ``prepare_inputs_labels_for_multimodal``):
    the fused text of each sample's valid tokens, the vision tokens at its placeholder,
    right-padded with zeros; returns the embeddings and the attention mask."""
    rows = []
    for i in range(ids.shape[0]):
        keep = valid[i].bool()
        text, row_ids = fused[i][keep], ids[i][keep]
        at = int((row_ids == IMAGE_TOKEN_INDEX).nonzero()[0])
        rows.append(torch.cat([text[:at], tokens[i], text[at + 1 :]]))
    n = max(len(r) for r in rows)
    out = torch.zeros(len(rows), n, rows[0].shape[-1])
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)], mask[i, : len(r)] = r, 1
    return out, mask


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reproduces_the_official_golden_fixture(case):
    """The official ``encode_images_mini`` / ``prepare_inputs_labels_for_multimodal`` with the
    same weights (loaded by their checkpoint names): the vision tokens and fused text, and the
    LLM's input once spliced (a video's fused text averaged over its 3 frames)."""
    method = tiny(case["compressor_size"])
    tokens, fused, _ = run(method, case)
    if "compressed" in case:
        torch.testing.assert_close(tokens, tensor(case["compressed"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused, tensor(case["fused_text"]), atol=1e-5, rtol=1e-5)
    ids, valid = torch.tensor(case["input_ids"]), torch.tensor(case["attention_mask"])
    embeds, mask = splice(ids, valid, fused, tokens)
    torch.testing.assert_close(embeds, tensor(case["inputs_embeds"]), atol=1e-5, rtol=1e-5)
    assert mask.tolist() == case["llm_attention_mask"]


@pytest.mark.parametrize("change", ["text_mask", "positions", "layer_norm_eps", "frame_mean"])
def test_the_fixture_test_fails_when_an_option_is_perturbed(change):
    case = next(c for c in CASES if c["frames"]) if change == "frame_mean" else CASES[0]
    method = tiny(case["compressor_size"])
    state = {}
    if change == "text_mask":
        state["text_mask"] = torch.ones(2, len(case["input_ids"][0]), dtype=torch.bool)
    if change == "positions":
        method = tiny(case["compressor_size"], rope_theta=100.0)
    if change == "layer_norm_eps":
        method.compressor.ln_kv.eps = 1e-2
    tokens, fused, _ = run(method, case, **state)
    if change == "frame_mean":  # the last frame's fused text instead of the mean
        _, fused, _ = run(method, {**case, "frames": None, "x": tensor(case["x"])[:, -1]})
    ids, valid = torch.tensor(case["input_ids"]), torch.tensor(case["attention_mask"])
    embeds, _ = splice(ids, valid, fused, tokens)
    assert not torch.allclose(embeds, tensor(case["inputs_embeds"]), atol=1e-5)


def test_the_compressors_positions_are_the_official_table():
    """The 2-D sin-cos table built here equals the official ``pos_embed`` (its state-dict key)."""
    for size, weights in GOLDEN["compressor_weights"].items():
        table = small(compressor_size=int(size)).compressor.pos_embed
        torch.testing.assert_close(table, tensor(weights["model.compressor.pos_embed"]))


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """Vicuna-7B (4096, 4 pre-fusion layers), CLIP-L/336 (1024), one vision token, as counted on
    the official ``build_compressor`` + ``build_vision_projector``; the official's frozen
    ``compressor.pos_embed`` Parameter is a buffer here."""
    with torch.device("meta"):
        method = LlavaMini()
    count = sum(p.numel() for p in method.parameters()) + method.compressor.pos_embed.numel()
    assert count == GOLDEN["parameters_at_default"] == 834_717_696
    by_part = GOLDEN["parameters_by_part"]
    assert (
        sum(p.numel() for p in method.prefusion_layers.parameters()) == by_part["prefusion_layers"]
    )


def small(**kwargs) -> LlavaMini:
    cfg = {**LlavaMini.test_configs["some"], "in_dim": 8, "out_dim": 16, "compressor_heads": 2}
    return LlavaMini(**{**cfg, "num_attention_heads": 2, "num_key_value_heads": 1, **kwargs}).eval()


def test_one_token_per_image_and_per_frame():
    """576 patches (24 x 24) to 1 token; an 8-frame video to 8; ``compressor_size=2``: 4."""
    method = small(compressor_size=1)
    image = method(torch.randn(2, 576, 8), ProjectorSignals(grid=(24, 24)))
    assert image.shape == (2, 1, 16) and method.num_tokens(576) == 1
    video = method(torch.randn(1, 8 * 64, 8), ProjectorSignals(grid=(8, 8), state={"frames": 8}))
    assert video.shape == (1, 8, 16) and method.num_tokens(8 * 64, frames=8) == 8
    assert small(compressor_size=2).num_tokens(576) == 4
    assert LlavaMini.count_setting(144, 576) == {"compressor_size": 12}
    assert LlavaMini.count_setting(10, 576) is None


def test_frames_are_compressed_independently_and_the_text_is_their_mean():
    method = small(compressor_size=1)
    x, text = torch.randn(2, 3 * 16, 8), torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    s = ProjectorSignals(grid=(4, 4), state={"frames": 3, "text_embeds": text, "text_mask": mask})
    with torch.no_grad():
        video, fused = method(x, s), s.state["fused_text"]
        frames = []
        for t in range(3):
            st = ProjectorSignals(grid=(4, 4), state={"text_embeds": text, "text_mask": mask})
            torch.testing.assert_close(video[:, t : t + 1], method(x[:, t * 16 : (t + 1) * 16], st))
            frames.append(st.state["fused_text"])
    torch.testing.assert_close(fused, torch.stack(frames).mean(0))
    torch.testing.assert_close(fused[1, 3:], text[1, 3:])  # masked text keeps its embedding


def test_prefusion_is_causal_and_fuses_the_image_into_the_text():
    """Module level: a text token depends on the image and on earlier text only; the vision
    tokens do not depend on the text."""
    method = small(compressor_size=1)
    image, comp, text = torch.randn(1, 16, 16), torch.randn(1, 1, 16), torch.randn(1, 4, 16)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        tok, fused = prefusion(method.prefusion_layers, image, comp, text, mask)
        text2 = text.clone()
        text2[:, 2:] += 1.0
        tok2, fused2 = prefusion(method.prefusion_layers, image, comp, text2, mask)
        torch.testing.assert_close(tok, tok2)
        torch.testing.assert_close(fused[:, :2], fused2[:, :2])
        _, fused3 = prefusion(method.prefusion_layers, image + 1.0, comp, text, mask)
    assert not torch.allclose(fused, fused3)
    empty = prefusion(torch.nn.ModuleList(), image, comp, text, mask)
    torch.testing.assert_close(empty[0], comp)
    torch.testing.assert_close(empty[1], text)


def test_more_queries_than_patches_and_frames_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="compressor_size"):
        small(compressor_size=5)(torch.randn(1, 16, 8), ProjectorSignals(grid=(4, 4)))
    with pytest.raises(ValueError, match="frames"):
        small()(torch.randn(1, 32, 8), ProjectorSignals(grid=(4, 4), state={"frames": 3}))
    with pytest.raises(ValueError, match="compressor_size"):
        LlavaMini(compressor_size=0)


def test_the_llava_host_feeds_the_fused_prompt_and_the_vision_tokens_to_its_decoder():
    """The host gives the projector its prompt's embeddings, and its first decoder layer sees
    ``[fused prefix][vision tokens][fused instruction]``: the official splice."""
    torch.manual_seed(0)
    method = LlavaMini(**LlavaMini.test_configs["some"]).eval()
    host = LlavaHost(TINY).eval().apply(projector=method)
    images, prefix, suffix, valid = llava_inputs()
    seen = []
    first = host.layers[0].forward
    host.layers[0].forward = lambda h, *a, **k: (seen.append(h), first(h, *a, **k))[1]
    with torch.no_grad():
        logits, cache = host.prefill(images, prefix, suffix, valid)
        text = host.embed_tokens(torch.cat([prefix, suffix], 1))
        mask = torch.cat([torch.ones_like(prefix, dtype=torch.bool), valid], 1)
        tokens, _ = host.encode_images(images, {"text_embeds": text, "text_mask": mask})
    assert cache["layers"][0]["k"].shape[2] == 2 + 4 + 5
    fused = host.last_state["fused_text"]
    assert fused.shape == (3, 7, TINY.hidden)
    torch.testing.assert_close(host.last_state["text_embeds"], text)
    (h,) = seen
    torch.testing.assert_close(h[:, :2], fused[:, :2])
    torch.testing.assert_close(h[:, 2:6], tokens)
    torch.testing.assert_close(h[:, 6:], fused[:, 2:])
    assert not torch.equal(h[:, :2], text[:, :2])  # the prompt really was replaced
    assert torch.isfinite(logits).all()


def test_batch_equals_alone_gradients_and_bf16():
    method = small(compressor_size=2)
    x, text = torch.randn(3, 16, 8), torch.randn(3, 5, 16)
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    s = ProjectorSignals(grid=(4, 4), state={"text_embeds": text, "text_mask": mask})
    with torch.no_grad():
        together, fused = method(x, s), s.state["fused_text"]
        for i in range(3):
            st = {"text_embeds": text[i : i + 1], "text_mask": mask[i : i + 1]}
            alone = ProjectorSignals(grid=(4, 4), state=st)
            torch.testing.assert_close(together[i], method(x[i : i + 1], alone)[0])
            torch.testing.assert_close(fused[i], alone.state["fused_text"][0])
    method.train()
    s = ProjectorSignals(grid=(4, 4), state={"text_embeds": text, "text_mask": mask})
    (method(x, s).square().mean() + s.state["fused_text"].square().mean()).backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
    half = method.eval().to(torch.bfloat16)
    st = {"text_embeds": text.bfloat16(), "text_mask": mask}
    out = half(x.bfloat16(), ProjectorSignals(grid=(4, 4), state=st))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@torch.no_grad()
def test_runs_on_a_video_in_the_llava_host():
    """``images [B, T, 3, H, W]``: one token per frame for 3 frames (``compressor_size=1``)."""
    torch.manual_seed(0)
    method = LlavaMini(**{**LlavaMini.test_configs["some"], "compressor_size": 1}).eval()
    host = LlavaHost(TINY).eval().apply(projector=method)
    images, prefix, suffix, valid = llava_inputs()
    video = torch.stack([images, images.flip(-1), images.flip(-2)], 1)  # [3, 3, 3, 32, 32]
    text = host.embed_tokens(torch.cat([prefix, suffix], 1))
    mask = torch.cat([torch.ones_like(prefix, dtype=torch.bool), valid], 1)
    state = {"text_embeds": text, "text_mask": mask}
    logits, cache = host.prefill(video, prefix, suffix, valid, state=state)
    assert cache["layers"][0]["k"].shape[2] == 2 + 3 + 5
    assert host.last_state["fused_text"].shape == (3, 7, TINY.hidden)
    assert torch.isfinite(logits).all()
