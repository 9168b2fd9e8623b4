"""FocusLLaVA (provisional, from the paper's abstract): both samplers, alone and together."""

from __future__ import annotations

import pytest
import torch

from reference.focusllava import FocusLLaVA, VisionGuidedSampler, regions_of
from reference.hosts.llava import TINY, LlavaHost, LLMSignals
from reference.projector import ProjectorSignals
from tests.reference.conftest import llava_inputs


def test_token_counts_at_the_llava_shape():
    """576 patches, 4 x 4 regions (36), 18 fine: 18 * 16 + 18 = 306 tokens."""
    sampler = VisionGuidedSampler(in_dim=16, out_dim=8)
    assert sampler.num_tokens(576) == 306
    out = sampler(torch.randn(2, 576, 16), ProjectorSignals(grid=(24, 24)))
    assert out.shape == (2, 306, 8)
    assert FocusLLaVA().kept(306) == 153
    assert VisionGuidedSampler.count_setting(306, 576) == {"fine_regions": 18}
    assert VisionGuidedSampler.count_setting(144, 576) is None  # 144 - 36 is not 15 * k


def test_fine_regions_keep_their_tokens_and_coarse_ones_their_mean():
    torch.manual_seed(0)
    sampler = VisionGuidedSampler(in_dim=4, out_dim=4, region=2, fine_regions=1)
    sampler.mm_projector = torch.nn.Identity()
    x = torch.randn(1, 16, 4)
    state: dict = {}
    out = sampler(x, ProjectorSignals(grid=(4, 4), state=state))
    windows = regions_of(x, (4, 4), 2)  # [1, 4, 4, C]
    (fine,) = state["focusllava"]["fine_regions"][0].tolist()
    expected = [
        windows[0, r] if r == fine else windows[0, r].mean(0, keepdim=True) for r in range(4)
    ]
    torch.testing.assert_close(out[0], torch.cat(expected))
    # The selector's best-scored region is the fine one.
    assert state["focusllava"]["scores"][0].argmax().item() == fine


def test_text_guided_sampler_keeps_the_most_attended_tokens():
    n_image, n = 8, 2 + 8 + 3
    attn = torch.zeros(1, 2, n, n)
    attn[:, :, 10:, 2 + 5] = 1.0  # the instruction looks at image tokens 5 and 1
    attn[:, :, 10:, 2 + 1] = 0.5
    signals = LLMSignals(2, n_image, torch.ones(1, n, dtype=torch.bool), attn=attn)
    out = FocusLLaVA(ratio=0.75)(torch.randn(1, n, 4), signals)
    assert out.index[0].tolist() == [0, 1, 3, 7, 10, 11, 12]


def test_rejects_unreachable_settings():
    with pytest.raises(ValueError, match=r"^fine_regions must be"):
        VisionGuidedSampler(in_dim=4, out_dim=4, region=2, fine_regions=5).num_tokens(16)
    with pytest.raises(ValueError, match=r"^region must"):
        VisionGuidedSampler(in_dim=4, out_dim=4, region=3).num_tokens(16)
    for kwargs, name in VisionGuidedSampler.invalid_configs:
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            VisionGuidedSampler(**kwargs)
    with pytest.raises(ValueError, match=r"^ratio must be"):
        FocusLLaVA(ratio=1.0)


def both(dtype=torch.float32) -> LlavaHost:
    torch.manual_seed(0)
    sampler = VisionGuidedSampler(**VisionGuidedSampler.test_configs["some"])
    host = LlavaHost(TINY).apply(projector=sampler, llm=FocusLLaVA.paper_placement(TINY.layers))
    return host.eval().to(dtype)


@torch.no_grad()
def test_both_samplers_in_the_host_and_each_sample_as_alone():
    host = both()
    images, prefix, suffix, valid = llava_inputs()
    together, _ = host.prefill(images, prefix, suffix, valid)
    (index,) = host.last_trace
    assert index.shape[1] == 2 + 3 + 5  # 4 + 3 image tokens in, ratio 0.5 drops round(3.5) = 4
    for i in range(3):
        n = int(valid[i].sum())
        alone, _ = host.prefill(
            images[i : i + 1], prefix[i : i + 1], suffix[i : i + 1, :n], valid[i : i + 1, :n]
        )
        torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)


def test_gradients_reach_the_scale_selector_and_projector():
    host = both().train()
    images, prefix, suffix, valid = llava_inputs()
    logits, _ = host.prefill(images, prefix, suffix, valid)
    logits.pow(2).mean().backward()
    sampler = host.projector
    assert sampler.scale_selector[1].weight.grad.abs().sum() > 0
    assert sampler.mm_projector[0].weight.grad.abs().sum() > 0


@torch.no_grad()
def test_bfloat16():
    host = both(torch.bfloat16)
    images, prefix, suffix, valid = llava_inputs(dtype=torch.bfloat16)
    logits, cache = host.prefill(images, prefix, suffix, valid)
    assert torch.isfinite(logits.float()).all()
    assert torch.isfinite(host.decode(logits.argmax(-1), cache).float()).all()
