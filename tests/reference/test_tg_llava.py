"""TG-LLaVA: a text-guided mask added to the patches; a text-guided perceiver over the crops."""

from __future__ import annotations

import re

import pytest
import torch

from reference.hosts.llava import TINY, LlavaHost
from reference.projector import ProjectorSignals
from reference.tg_llava import TGLLaVA, load_official
from tests.reference.conftest import assert_cached_decoding_matches, llava_inputs
from tests.reference.fixtures import load, tensor

GOLDEN = load("tg_llava")
CASE = GOLDEN["cases"][0]


def tiny(case: dict = CASE) -> TGLLaVA:
    """The fixture's modules (4 wide, text 6, LLM 5; Q-Former 2 layers of 2 heads, FFN 8;
    perceiver 4 heads of 2, 2 kv heads), loaded from the official state dict."""
    method = TGLLaVA(
        4,
        5,
        text_dim=6,
        num_query=case["num_query"],
        crops=case["crops"],
        n_latents=case["n_latents"],
        depth=case["depth"],
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=8,
        resampler_n_heads=case["heads"],
        resampler_head_dim=case["head_dim"],
        num_key_value_heads=case["kv_heads"],
    ).eval()
    load_official(method, {k: tensor(v) for k, v in case["weights"].items()})
    return method


def signals(case: dict = CASE) -> ProjectorSignals:
    text, pooled = tensor(case["text"]), tensor(case["text_pooled"])
    return ProjectorSignals(state={"text": text, "text_pooled": pooled})


def test_reproduces_the_official_golden_fixture():
    """The official mm_projector, mm_cross_attn and mm_patch_encoder as ``encode_images`` wires
    them, same weights (loaded from the official state dict, unused Q-Former keys included)."""
    with torch.no_grad():
        out = tiny()(tensor(CASE["features"]), signals())
    torch.testing.assert_close(out, tensor(CASE["out"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change", ["pooled", "no_text", "layer_order", "positions", "mask", "kv_grouping"]
)
def test_the_fixture_test_fails_when_an_option_is_perturbed(change, monkeypatch):
    method, s = tiny(), signals()
    if (
        change == "kv_grouping"
    ):  # heads (0, 1, 2, 3) reading kv heads (0, 1, 0, 1), not (0, 0, 1, 1)
        monkeypatch.setattr(
            torch.Tensor, "repeat_interleave", lambda t, r, dim: t.repeat(1, r, 1, 1)
        )
    if change == "pooled":  # the last token of text instead of the tower's pooler_output
        s.state.pop("text_pooled")
    if change == "no_text":
        s.state.clear()
    if change == "layer_order":  # crops first, then the text
        method.mm_patch_encoder.perceiver.layers = method.mm_patch_encoder.perceiver.layers[::-1]
    if change == "positions":
        method.mm_patch_encoder.position_embedding.weight.data.zero_()
    if change == "mask":  # the guidance dropped
        method.mm_cross_attn.zero_layer.weight.data.zero_()
    with torch.no_grad():
        out = method(tensor(CASE["features"]), s)
    assert not torch.allclose(out, tensor(CASE["out"]), atol=1e-5)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """CLIP ViT-L/14-336 (1024; CLIP text 768) -> a 4096-wide LLM, 576 queries, 4 crops, 64
    latents: the official modules' count less the Q-Former parts the query path never uses
    (word and position embeddings, text FFNs, MLM head)."""
    with torch.device("meta"):  # shapes only
        count = sum(p.numel() for p in TGLLaVA().parameters())
    assert count == 112_130_048
    assert count + GOLDEN["parameters_unused_by_the_query_path"] == 161_782_586
    assert GOLDEN["parameters_at_default"] == 161_782_586


def test_576_patches_and_four_crops_give_640_tokens():
    """The paper's setting: 576 + 4 x 576 patch tokens in, 576 guided + 64 detail tokens out."""
    method = TGLLaVA(
        8,
        8,
        text_dim=4,
        num_attention_heads=2,
        intermediate_size=8,
        resampler_n_heads=2,
        resampler_head_dim=4,
        num_key_value_heads=1,
    )
    s = ProjectorSignals(state={"text": torch.randn(1, 7, 4)})
    out = method(torch.randn(1, 5 * 576, 8), s)
    assert out.shape == (1, 640, 8) and method.num_tokens(5 * 576) == 640
    with pytest.raises(ValueError, match="takes 5 views"):
        method(torch.randn(1, 576, 8), s)


def test_the_pooled_text_is_the_last_token_under_the_mask():
    method = tiny()
    text = tensor(CASE["text"])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    x = tensor(CASE["features"])
    with torch.no_grad():
        got = method(x, ProjectorSignals(state={"text": text, "text_mask": mask}))
        pooled = torch.stack([text[0, 2], text[1, 1]])
        want = method(x, ProjectorSignals(state={"text": text, "text_pooled": pooled}))
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="not token ids"):
        method(x, ProjectorSignals(state={"text": torch.ones(2, 3, dtype=torch.long)}))


def test_the_mask_starts_at_zero_and_the_state_dict_must_be_complete():
    """The zero-initialised ``zero_layer``: a fresh module's guided tokens are plain LLaVA's."""
    torch.manual_seed(0)
    method = TGLLaVA(**TGLLaVA.test_configs["some"]).eval()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        guided = method(x, ProjectorSignals(state={"text": torch.randn(2, 3, 32)}))
    torch.testing.assert_close(guided[:, :4], method.mm_projector(x[:, :4]))
    weights = {k: tensor(v) for k, v in CASE["weights"].items()}
    weights.pop("mm_cross_attn.query_tokens")
    with pytest.raises(RuntimeError, match="query_tokens"):
        load_official(tiny(), weights)


@torch.no_grad()
def test_runs_in_the_llava_host_with_the_instruction_in_state():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(projector=TGLLaVA(**TGLLaVA.test_configs["some"]))
    state = {"text": torch.randn(3, 4, TINY.vision["embed_dim"])}
    keys = assert_cached_decoding_matches(host, *llava_inputs(), state=state)
    assert keys == 2 + 4 + 2 + 5  # prefix, 4 guided + 2 detail tokens, instruction


def test_batch_equals_alone_gradients_and_bfloat16():
    torch.manual_seed(0)
    method = TGLLaVA(**TGLLaVA.test_configs["some"]).eval()  # no dropout: batch = alone
    torch.nn.init.normal_(method.mm_cross_attn.zero_layer.weight)  # so the Q-Former gets a signal
    x = torch.randn(3, 16, 32, requires_grad=True)
    text = torch.randn(3, 4, 32)
    out = method(x, ProjectorSignals(state={"text": text}))
    for i in range(3):
        alone = method(x[i : i + 1], ProjectorSignals(state={"text": text[i : i + 1]}))
        torch.testing.assert_close(out[i], alone[0], rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    for name, p in method.named_parameters():
        # As the official: the queries cross-attend to ONE pooled text vector, so the softmax is
        # 1 and that attention's query and key weights get no gradient (only its value path).
        one_key = re.search(r"crossattention\.self\.(query|key)\.", name)
        assert p.grad is not None and (p.grad.abs().sum() == 0) == bool(one_key), name
    half = method.to(torch.bfloat16)
    y = half(x.detach().bfloat16(), ProjectorSignals(state={"text": text.bfloat16()}))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
