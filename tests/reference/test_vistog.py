"""VisToG (provisional, from the paper's abstract): isolated attention, grouping, the host."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference.hosts.llava import TINY, LlavaHost
from reference.hosts.vit import Block
from reference.projector import ProjectorSignals
from reference.vistog import VisToG, hard_assign, isolated_block
from tests.reference.conftest import llava_inputs


def masked_block(block: Block, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The whole block on ``x``, every query reading only the keys ``allowed`` [N, N]."""
    b, n, c = x.shape
    qkv = block.attn.qkv(block.norm1(x)).view(b, n, 3, block.attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    x = x + block.attn.proj(out.transpose(1, 2).reshape(b, n, c))
    return x + block.mlp(block.norm2(x))


def test_isolated_attention_leaves_the_patches_and_reads_them():
    """Patches never read the semantic tokens (their block output is the plain one), the
    semantic tokens read everything: the same as one masked pass over the concatenation."""
    torch.manual_seed(0)
    block = Block(16, 4).eval()
    patches, tokens = torch.randn(2, 9, 16), torch.randn(2, 3, 16)
    allowed = torch.ones(12, 12, dtype=torch.bool)
    allowed[:9, 9:] = False
    joint = masked_block(block, torch.cat([patches, tokens], 1), allowed)
    alone = masked_block(block, patches, torch.ones(9, 9, dtype=torch.bool))
    torch.testing.assert_close(joint[:, :9], alone)
    torch.testing.assert_close(isolated_block(block, patches, tokens), joint[:, 9:])


def test_token_counts_and_parameters_at_the_default():
    c, d, g = 1024, 4096, 256
    method = VisToG()
    assert method.num_tokens(576) == g
    expected = g * c + 2 * 2 * c + 4 * (c * c + c) + 2 * c + (8 * c * c + 5 * c)
    expected += c * d + d + d * d + d
    assert sum(p.numel() for p in method.parameters()) == expected
    with pytest.raises(ValueError, match=r"^num_groups must be"):
        VisToG(in_dim=8, out_dim=8, num_groups=16).num_tokens(16)


def test_each_patch_joins_exactly_its_best_group():
    logits = torch.randn(2, 3, 10)
    assign = hard_assign(logits, gumbel=False)
    assert torch.equal(assign.sum(1), torch.ones(2, 10))
    assert torch.equal(assign.argmax(1), logits.argmax(1))


def bound_host(dtype=torch.float32) -> LlavaHost:
    torch.manual_seed(0)
    host = LlavaHost(TINY)
    method = VisToG(**VisToG.test_configs["some"]).bind(host.vision_tower.blocks)
    return host.apply(projector=method).eval().to(dtype)


@torch.no_grad()
def test_bound_to_the_host_encoder_each_sample_as_alone():
    host = bound_host()
    n_host = sum(p.numel() for p in LlavaHost(TINY).parameters())
    n_method = sum(p.numel() for p in host.projector.parameters())
    assert sum(p.numel() for p in host.parameters()) == n_host + n_method  # blocks not twice
    images, prefix, suffix, valid = llava_inputs()
    state: dict = {}
    together, _ = host.prefill(images, prefix, suffix, valid, state=state)
    assert host.last_state["vistog"]["assign"].shape == (3, 16)
    for i in range(3):
        n = int(valid[i].sum())
        alone, _ = host.prefill(
            images[i : i + 1], prefix[i : i + 1], suffix[i : i + 1, :n], valid[i : i + 1, :n]
        )
        torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)


def test_the_encoder_pass_changes_the_groups():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    method = VisToG(**VisToG.test_configs["some"]).eval()
    layers = tuple(torch.randn(2, 17, 32) for _ in range(2))
    signals = ProjectorSignals(layers=layers, grid=(4, 4))
    unbound = method(layers[-1][:, 1:], signals)
    bound = method.bind(host.vision_tower.blocks)(layers[-1][:, 1:], signals)
    assert unbound.shape == bound.shape == (2, 4, 64)
    assert not torch.allclose(unbound, bound)


def test_gradients_reach_the_semantic_tokens_through_the_encoder():
    host = bound_host().train()
    images, prefix, suffix, valid = llava_inputs()
    logits, _ = host.prefill(images, prefix, suffix, valid)
    logits.pow(2).mean().backward()
    method = host.projector
    for p in (method.semantic_tokens, method.assign.q_proj.weight, method.mm_projector[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@torch.no_grad()
def test_bfloat16():
    host = bound_host(torch.bfloat16)
    images, prefix, suffix, valid = llava_inputs(dtype=torch.bfloat16)
    logits, cache = host.prefill(images, prefix, suffix, valid)
    assert torch.isfinite(logits.float()).all()
    assert torch.isfinite(host.decode(logits.argmax(-1), cache).float()).all()
