"""QueCC: question-injected, conv-downsampled queries attend to their own region."""

from __future__ import annotations

import pytest
import torch

from reference.hosts.llava import TINY, LlavaHost
from reference.projector import ProjectorSignals
from reference.quecc import QueCC, load_official
from tests.reference.conftest import assert_cached_decoding_matches, llava_inputs
from tests.reference.fixtures import load, tensor

GOLDEN = load("quecc")
CASES = GOLDEN["cases"]


def tiny(case: dict, **kwargs) -> QueCC:
    """The fixture's module (8 wide, 8 heads of 1; text 6 wide; MLP to 5) with its weights,
    loaded by the official ``build_vision_projector`` names."""
    options = dict(
        visual_token_count=case["grid"] ** 2,
        kernel_size=case["kernel_size"],
        stride=case["stride"],
        multi_layers=tuple(case["multi_layers"]),
    )
    method = QueCC(8, 5, text_dim=6, **{**options, **kwargs}).eval()
    load_official(method, {k: tensor(v) for k, v in case["weights"].items()})
    return method


def signals(case: dict) -> tuple[torch.Tensor, ProjectorSignals]:
    layers = tuple(tensor(t) for t in case["layers"])
    grid = (case["grid"],) * 2
    return layers[-1][:, 1:], ProjectorSignals(layers, grid, {"text": tensor(case["text"])})


IDS = [f"g{c['grid']}-k{c['kernel_size']}-s{c['stride']}-l{len(c['multi_layers'])}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reproduces_the_official_golden_fixture(case):
    """The official ``build_vision_projector`` (QueCC, then the MLP) with the same weights."""
    x, s = signals(case)
    with torch.no_grad():
        out = tiny(case)(x, s)
    torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["no_text", "levels", "conv_layout", "other_samples_levels"])
def test_the_fixture_test_fails_when_an_option_is_perturbed(change):
    case = CASES[0]  # 4 x 4 grid, kernel 2, stride 2, levels 1 and 2
    x, s = signals(case)
    method = tiny(case)
    if change == "no_text":
        s.state.pop("text")
    if change == "levels":  # the same width, the levels swapped
        method.multi_layers = (2, 1)
    if change == "conv_layout":  # the grid read column-major instead of row-major
        method.q_downsample.weight.data = method.q_downsample.weight.data.transpose(-1, -2)
    if change == "other_samples_levels":
        s = ProjectorSignals(tuple(t.flip(0) for t in s.layers), s.grid, s.state)
    with torch.no_grad():
        out = method(x, s)
    assert not torch.allclose(out, tensor(case["out"]), atol=1e-5)


def test_parameter_count_at_the_paper_setting_equals_the_official_module():
    """The released scripts: CLIP ViT-L/14-336 (1024, four levels), Vicuna-7B (4096), the
    question from Vicuna (4096), kernel 4, stride 4; QueCC 21,008,384 + MLP 20,979,712."""
    with torch.device("meta"):  # shapes only
        count = sum(p.numel() for p in QueCC().parameters())
    assert count == GOLDEN["parameters_at_default"] == 41_988_096


@pytest.mark.parametrize(("kernel", "m"), [(2, 144), (4, 36), (6, 16), (12, 4), (24, 1)])
def test_compresses_576_patches_to_the_papers_counts(kernel, m):
    """The paper's settings: 576 -> 144, 36, 16, 4, 1 tokens (kernel = stride)."""
    method = QueCC(8, 8, text_dim=4, kernel_size=kernel, stride=kernel, multi_layers=(1,))
    layers = (torch.randn(1, 577, 8),)
    s = ProjectorSignals(layers, (24, 24), {"text": torch.randn(1, 3, 4)})
    out = method(layers[-1][:, 1:], s)
    assert out.shape == (1, m, 8) and method.num_tokens(576) == m


def test_each_query_sees_only_its_own_region_of_the_levels():
    torch.manual_seed(0)
    method = QueCC(8, 8, 8, 16, kernel_size=2, stride=2, multi_layers=(1, 2)).eval()
    layers = tuple(torch.randn(1, 17, 8) for _ in range(2))
    x = torch.randn(1, 16, 8)
    before = method(x, ProjectorSignals(layers))
    changed = tuple(t.clone() for t in layers)
    for t in changed:
        t[:, 1 + 2 * 4 + 2] = torch.randn(8)  # patch (2, 2): the bottom-right region, token 3
    moved = (method(x, ProjectorSignals(changed)) - before).abs().amax(-1)[0]
    assert moved[3] > 1e-4 and torch.all(moved[:3] == 0)


def test_the_question_is_its_last_token_or_the_last_under_the_mask():
    """A sequence of LLM states gives its last (unmasked) token, as the official does."""
    torch.manual_seed(0)
    method = QueCC(8, 8, 6, 16, kernel_size=2, stride=2, multi_layers=(1,)).eval()
    layers = (torch.randn(2, 17, 8),)
    x = layers[0][:, 1:]
    seq = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    last = torch.stack([seq[0, 4], seq[1, 2]])
    with torch.no_grad():
        got = method(x, ProjectorSignals(layers, state={"text": seq, "text_mask": mask}))
        want = method(x, ProjectorSignals(layers, state={"text": last}))
        unmasked = method(x, ProjectorSignals(layers, state={"text": seq}))
        alone = method(x, ProjectorSignals(layers))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got[1], unmasked[1]) and not torch.allclose(got, alone)
    with pytest.raises(ValueError, match="not token ids"):
        method(x, ProjectorSignals(layers, state={"text": torch.ones(2, 5, dtype=torch.long)}))


def test_unreachable_settings_and_missing_inputs_are_refused():
    with pytest.raises(ValueError, match=r"^stride must"):
        QueCC(kernel_size=5, stride=4)  # 24 -> 5, which does not tile 24
    with pytest.raises(ValueError, match=r"^visual_token_count must"):
        QueCC(visual_token_count=577)  # CLS and patches: not a square grid
    method = QueCC(8, 8, 8, 16, kernel_size=2, stride=2, multi_layers=(1, 3))
    layers = tuple(torch.randn(1, 17, 8) for _ in range(2))
    with pytest.raises(ValueError, match="multi_layers"):
        method(layers[-1][:, 1:], ProjectorSignals(layers))
    with pytest.raises(ValueError, match="takes 16"):
        method(torch.randn(1, 25, 8), ProjectorSignals(layers))


@torch.no_grad()
def test_runs_in_the_llava_host_with_the_question_in_state():
    torch.manual_seed(0)
    method = QueCC(**QueCC.test_configs["some"])
    host = LlavaHost(TINY).eval().apply(projector=method)
    state = {"text": torch.randn(3, 4, TINY.vision["embed_dim"])}
    keys = assert_cached_decoding_matches(host, *llava_inputs(), state=state)
    assert keys == 2 + 4 + 5  # prefix, 16 patches -> 4 tokens, instruction


def test_batch_equals_alone_gradients_and_bfloat16():
    torch.manual_seed(0)
    method = QueCC(**QueCC.test_configs["some"])
    layers = tuple(torch.randn(3, 17, 32) for _ in range(2))
    text = torch.randn(3, 4, 32)
    x = layers[-1][:, 1:].clone().requires_grad_(True)
    out = method(x, ProjectorSignals(layers, (4, 4), {"text": text}))
    for i in range(3):
        alone = ProjectorSignals(
            tuple(t[i : i + 1] for t in layers), (4, 4), {"text": text[i : i + 1]}
        )
        torch.testing.assert_close(out[i], method(x[i : i + 1], alone)[0], rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in method.parameters()) and x.grad is not None
    half = method.to(torch.bfloat16)
    s = ProjectorSignals(tuple(t.bfloat16() for t in layers), (4, 4), {"text": text.bfloat16()})
    y = half(x.detach().bfloat16(), s)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
