"""Evo-ViT's own invariants: evolving global attention, representative token, fast update."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference.core import Signals
from reference.evo_vit import STATE_KEY, EvoViT
from reference.hosts import vit
from tests.reference.conftest import B, C, H, N, tiny_host, tokens
from tests.reference.fixtures import load, tensor

GOLDEN = load("evo_vit")


def signals_with(cls_attn: torch.Tensor, state: dict, size: torch.Tensor | None = None) -> Signals:
    b, _, n = cls_attn.shape
    size = torch.ones(b, n, 1) if size is None else size
    return Signals(prefix=1, size=size, cls_attn=cls_attn, state=state)


def random_attn(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, generator=gen).softmax(-1)  # [B, H, N]


def test_first_hook_keeps_top_k_and_adds_the_g_weighted_mean_of_placeholders():
    x, attn = tokens(), random_attn(N, 0)
    out = EvoViT(keep_rate=0.5)(x, signals_with(attn, {}))
    g = attn.mean(1)[:, 1:]  # [B, M]
    top = g.topk(8, dim=1).indices.sort(1).values
    assert out.num_tokens == 1 + 8 + 1
    assert torch.equal(out.index[:, 1:9], top + 1) and (out.index[:, -1] == -1).all()
    rest = torch.ones_like(g).scatter(1, top, 0.0)
    w = g * rest / (g * rest).sum(1, keepdim=True)
    torch.testing.assert_close(out.x[:, -1], (w[..., None] * x[:, 1:]).sum(1))
    assert (out.size[:, -1, 0] == 8).all()
    placeholders = rest.bool()
    assert (out.assign[:, 1:][placeholders] == 9).all()


def test_placeholders_get_the_representative_update_and_can_be_reselected():
    x, state = tokens(), {}
    first = EvoViT(keep_rate=0.5)(x, signals_with(random_attn(N, 0), state))
    carried = state[STATE_KEY]["tokens"].clone()
    placeholder = torch.ones(B, N - 1).scatter(1, state[STATE_KEY]["top"], 0.0).bool()

    # The block changes every token; the representative token moves by `delta`.
    delta = torch.randn(B, 1, C)
    y = first.x + 0.1 * torch.randn_like(first.x)
    y[:, -1:] = first.x[:, -1:] + delta
    # This layer's CLS attention puts everything on the informative tokens, so
    # the placeholders' old g values compete with halved ones (alpha = 0.5).
    attn = torch.zeros(B, H, first.num_tokens)
    attn[:, :, 1:9] = 1.0
    second = EvoViT(keep_rate=0.5)(y, signals_with(attn, state, first.size))
    assert second.num_tokens == first.num_tokens

    new = state[STATE_KEY]
    torch.testing.assert_close(new["tokens"][placeholder], (carried + delta)[placeholder])
    old_top = first.index[:, 1:9] - 1
    g_old = random_attn(N, 0).mean(1)[:, 1:]
    expected_g = g_old.scatter(1, old_top, 0.5 * g_old.gather(1, old_top) + 0.5)
    torch.testing.assert_close(new["g"], expected_g)
    # Re-selected placeholders come back with their fast-updated value and index -1.
    back = second.index[:, 1:9] == -1
    assert back.any() == (expected_g.topk(8, 1).indices.sort(1).values != old_top).any()
    for i in range(B):
        for j, slot in enumerate(range(1, 9)):
            token = new["top"][i, j]
            torch.testing.assert_close(second.x[i, slot], new["tokens"][i, token])
            if back[i, j]:
                torch.testing.assert_close(second.x[i, slot], carried[i, token] + delta[i, 0])


def test_keep_rate_one_after_reducing_hooks_restores_every_token_in_place():
    x, state = tokens(), {}
    first = EvoViT(keep_rate=0.25)(x, signals_with(random_attn(N, 1), state))
    restored = EvoViT(keep_rate=1.0)(
        first.x, signals_with(random_attn(first.num_tokens, 2), state, first.size)
    )
    assert restored.num_tokens == N and STATE_KEY not in state
    torch.testing.assert_close(restored.x[:, 1:], x[:, 1:])  # nothing moved: delta is zero
    assert restored.size.sum(1).eq(N).all()


def test_without_representative_placeholders_are_carried_unchanged():
    x, state = tokens(), {}
    out = EvoViT(keep_rate=0.5, representative=False)(x, signals_with(random_attn(N, 0), state))
    assert out.num_tokens == 1 + 8 and (out.assign == -1).sum() == B * 8
    torch.testing.assert_close(state[STATE_KEY]["tokens"], x[:, 1:])


def test_host_keeps_a_constant_token_count_across_chained_hooks():
    host = tiny_host()
    vit.apply(host, {layer: EvoViT(keep_rate=0.5) for layer in (1, 2, 3)})
    logits = host(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(logits).all()
    assert vit.tokens_after(host) == [10, 10, 10]
    assert host.last_state.state[STATE_KEY]["tokens"].shape == (2, N - 1, C)


def _levit_block(x: torch.Tensor, case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's official block (LeViT attention and MLP, identity BatchNorms):
    its output and the attention ``[B, H, N, N]``."""
    b, n, _ = x.shape
    h, kd = case["num_heads"], case["key_dim"]
    qkv = (x @ tensor(case["qkv"]).t()).view(b, n, h, -1)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([kd, kd, case["attn_ratio"] * kd], dim=3))
    attn = (q @ k.transpose(-1, -2) * kd**-0.5).softmax(-1)  # [B, H, N, N]
    x = x + F.hardswish((attn @ v).transpose(1, 2).reshape(b, n, -1)) @ tensor(case["proj"]).t()
    return x + F.hardswish(x @ tensor(case["fc1"]).t()) @ tensor(case["fc2"]).t(), attn


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"keep{c['keep_rate']}")
def test_reproduces_the_official_slow_fast_update_golden_fixture(case):
    """One official ``CatModule`` block: a hook selects with the given global attention
    (fed in as the CLS attention of a first hook), the block runs on the informative
    tokens plus the representative token, and the next hook, given this block's CLS
    attention, evolves ``g`` and fast-updates the placeholders. Selection, every token
    (in spatial order), the CLS token and ``g`` are the official ones."""
    x, g0 = tensor(case["x"]), tensor(case["global_attn"])
    b, n, c = x.shape
    m, heads = n - 1, case["num_heads"]
    method, state = EvoViT(keep_rate=case["keep_rate"]).eval(), {}
    cls_attn = torch.cat([torch.zeros(b, 1), g0], 1)[:, None].expand(b, heads, n)
    size = torch.ones(b, n, 1)
    first = method(x, Signals(prefix=1, size=size, cls_attn=cls_attn, state=state))
    y, attn = _levit_block(first.x, case)
    second = method(y, Signals(prefix=1, size=first.size, cls_attn=attn[:, :, 0], state=state))

    out, order = tensor(case["out"]), tensor(case["out_indices"], torch.long)  # [B, M]
    k = int(case["keep_rate"] * m)
    assert torch.equal(first.index[:, 1 : 1 + k] - 1, order[:, :k].sort(1).values)
    assert (first.index[:, -1] == -1).all()  # the representative token
    spatial = torch.empty(b, m, c).scatter(1, order[..., None].expand(-1, -1, c), out[:, 1:])
    g = torch.empty(b, m).scatter(1, order, tensor(case["out_global_attn"]))
    torch.testing.assert_close(state[STATE_KEY]["tokens"], spatial, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[STATE_KEY]["g"], g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second.x[:, 0], out[:, 0], atol=1e-5, rtol=1e-5)
