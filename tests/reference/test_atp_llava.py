"""ATP-LLaVA (provisional, from the paper's abstract): learned thresholds, soft and hard paths."""

from __future__ import annotations

import pytest
import torch

from reference.atp_llava import ATPLLaVA, budget_loss, spatial_score
from reference.hosts.llava import TINY, LlavaHost, LLMSignals
from tests.reference.conftest import llava_inputs


def signals(n_image=576, n_text=6, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 3 + n_image + n_text
    attn = torch.rand(b, 2, n, n, generator=g).tril().softmax(-1)
    valid = torch.ones(b, n, dtype=torch.bool)
    return LLMSignals(image_start=3, image_len=n_image, valid=valid, attn=attn, state={}), n


def test_untrained_counts_at_the_llava_shape():
    """576 tokens, thresholds at their start (0.7, 0.9): the stride-4 grid (36 tokens) stays
    by the spatial branch, and the top 30% of the other 540 by redundancy (162): 198."""
    sig, n = signals()
    method = ATPLLaVA(dim=32, mlp_dim=8).eval()
    out = method(torch.randn(1, n, 32), sig)
    assert out.index.shape[1] == n - 576 + 36 + 162
    kept = out.index[0, 3:-6] - 3
    assert set(range(0, 576, 4 * 24)) <= set(kept.tolist())  # row 0, 4, ... col 0 on the grid
    assert (kept.diff() > 0).all()


def test_spatial_score_levels():
    pos = torch.arange(16)[None]
    s = spatial_score(pos, 4, (2, 4))
    assert s[0, 0] == 1 - 1 / 16 and s[0, 2] == s[0, 8] == 1 - 4 / 16 and s[0, 1] == 0


def test_hard_keep_is_the_soft_mask_above_one_half():
    sig, n = signals(n_image=64)
    method = ATPLLaVA(dim=32, mlp_dim=8, strides=(4, 2)).eval()
    torch.nn.init.normal_(method.threshold_mlp[2].weight, std=0.5)
    h = torch.randn(1, n, 32)
    m = method.keep_mask(h, LLMSignals(**{**sig.__dict__, "state": {}}))
    out = method(h, sig)
    assert (out.index[0, 3:-6] - 3).tolist() == (m[0] > 0.5).nonzero()[:, 0].tolist()


def test_thresholds_and_counts_depend_on_the_instance():
    torch.manual_seed(0)
    method = ATPLLaVA(dim=32, mlp_dim=8, strides=(4, 2)).eval()
    torch.nn.init.normal_(method.threshold_mlp[2].weight, std=1.0)
    counts = set()
    for seed in range(4):
        sig, n = signals(n_image=64, seed=seed)
        h = torch.randn(1, n, 32, generator=torch.Generator().manual_seed(seed))
        counts.add(method(h, sig).index.shape[1])
    assert len(counts) > 1


def test_a_batch_keeps_its_largest_count():
    method = ATPLLaVA(dim=32, mlp_dim=8, strides=(4, 2)).eval()
    torch.nn.init.normal_(method.threshold_mlp[2].weight, std=1.0)
    sig, n = signals(n_image=64, b=3)
    h = torch.randn(3, n, 32)
    m = method.keep_mask(h, LLMSignals(**{**sig.__dict__, "state": {}}))
    out = method(h, sig)
    assert out.index.shape[1] - 9 == int((m > 0.5).sum(1).max())


def test_rejects_a_non_square_image_and_bad_bounds():
    sig, n = signals(n_image=15)
    with pytest.raises(ValueError, match="square grid"):
        ATPLLaVA(dim=32, mlp_dim=8).eval()(torch.randn(1, n, 32), sig)
    with pytest.raises(ValueError, match=r"^max_keep must be"):
        ATPLLaVA(dim=32, min_keep=0.5, max_keep=0.25)
    with pytest.raises(ValueError, match=r"^strides must be"):
        ATPLLaVA(dim=32, strides=(1,))


def test_runs_at_the_paper_placement_in_the_host():
    torch.manual_seed(0)
    placement = ATPLLaVA.paper_placement(TINY.layers, dim=TINY.hidden, mlp_dim=8, strides=(2,))
    assert len(placement) > 1
    host = LlavaHost(TINY).apply(llm=placement).eval()
    images, prefix, suffix, valid = llava_inputs()
    with torch.no_grad():
        logits, _ = host.prefill(images, prefix, suffix, valid)
    lengths = [index.shape[1] for index in host.last_trace]
    assert torch.isfinite(logits).all() and lengths == sorted(lengths, reverse=True)
    assert lengths[-1] < 2 + 16 + 5


def test_training_keeps_every_token_and_trains_the_thresholds():
    torch.manual_seed(0)
    host = LlavaHost(TINY).apply(llm={1: ATPLLaVA(dim=TINY.hidden, mlp_dim=8, strides=(2,))})
    host.train()
    images, prefix, suffix, valid = llava_inputs()
    logits, _ = host.prefill(images, prefix, suffix, valid)
    (index,) = host.last_trace
    assert index.shape[1] == 2 + 16 + 5
    loss = logits.float().pow(2).mean() + budget_loss(host.last_state, 0.25)
    loss.backward()
    mlp = host.llm_reducers["1"].threshold_mlp
    assert mlp[2].weight.grad.abs().sum() > 0 and mlp[2].bias.grad.abs().sum() > 0


def test_bfloat16_in_the_host():
    torch.manual_seed(0)
    method = ATPLLaVA(dim=TINY.hidden, mlp_dim=8, strides=(2,))
    host = LlavaHost(TINY).apply(llm={1: method}).eval().to(torch.bfloat16)
    images, prefix, suffix, valid = llava_inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        logits, _ = host.prefill(images, prefix, suffix, valid)
    assert torch.isfinite(logits.float()).all()
