"""Token Cropr's own invariants: top-k by the router, stop-gradient, aux head, LLF."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals
from reference.hosts import vit
from reference.token_cropr import AUX_KEY, LastLayerFusion, TokenCropr, cropr_reducers
from tests.reference.conftest import B, C, N, tiny_host, tokens
from tests.reference.fixtures import load, tensor

GOLDEN = load("token_cropr")


def signals(x: torch.Tensor, prefix: int = 1) -> Signals:
    return Signals(prefix=prefix, size=torch.ones(x.shape[0], x.shape[1], 1))


def router(**kwargs) -> TokenCropr:
    torch.manual_seed(0)
    return TokenCropr(C, **kwargs)


def test_inference_keeps_top_k_of_query_key_scores():
    x, method = tokens(), router(r=5, num_queries=2, num_heads=4).eval()
    out = method(x, signals(x))
    scores = (x @ method.queries.T).sum(-1)  # summed over queries and heads
    expected = scores[:, 1:].topk(N - 1 - 5, dim=1).indices + 1
    for i in range(B):
        assert set(out.index[i, 1:].tolist()) == set(expected[i].tolist())
    kept_scores = scores.gather(1, out.index[:, 1:])
    assert (kept_scores.diff(dim=1) < 0).all()  # best first, as the official prune
    torch.testing.assert_close(out.x, x.gather(1, out.index[..., None].expand(-1, -1, C)))
    spatial = router(r=5, num_queries=2, num_heads=4, score_order=False).eval()(x, signals(x))
    assert (spatial.index[:, 1:].diff(dim=1) > 0).all()  # original order
    assert torch.equal(spatial.index.sort(1).values, out.index.sort(1).values)


def test_training_prunes_hard_and_stops_gradients_into_the_router():
    x = tokens().requires_grad_(True)
    method = router(r=5)
    train = method.train()(x, signals(x))
    evaluated = method.eval()(x, signals(x))
    assert torch.equal(train.index, evaluated.index) and train.num_tokens == N - 5
    assert torch.equal(train.mask, torch.ones_like(train.mask))
    train.x.square().sum().backward()
    assert method.queries.grad is None  # the task loss never reaches the router


def test_aux_head_trains_router_but_not_backbone():
    x = tokens().requires_grad_(True)
    method, sig = router(r=4, num_classes=7, num_heads=2).train(), signals(x)
    method(x, sig)
    (logits,) = sig.state[AUX_KEY]
    assert logits.shape == (B, 7)
    torch.nn.functional.cross_entropy(logits, torch.zeros(B, dtype=torch.long)).backward()
    assert method.queries.grad is not None and method.queries.grad.abs().sum() > 0
    assert x.grad is None  # stop-gradient on the router's input


def test_last_layer_fusion_restores_the_pruned_tokens():
    x = tokens()
    sig = signals(x)
    a = router(r=3, fuse_last=True, score_order=False).eval()(x, sig)
    b = router(r=2, fuse_last=True, score_order=False).eval()(
        a.x, Signals(prefix=1, size=a.size, state=sig.state)
    )
    fused = LastLayerFusion()(b.x, Signals(prefix=1, size=b.size, state=sig.state))
    assert fused.num_tokens == N and (fused.index[:, b.num_tokens :] == -1).all()
    dropped = (a.assign < 0).nonzero()[:, 1].view(B, 3)
    torch.testing.assert_close(
        fused.x[:, b.num_tokens : b.num_tokens + 3],
        x.gather(1, dropped[..., None].expand(-1, -1, C)),
    )
    # Every input token appears exactly once after fusion.
    flat = torch.sort(fused.x.sum(-1), dim=1).values
    torch.testing.assert_close(flat, torch.sort(x.sum(-1), dim=1).values)


def test_official_placement_on_the_host():
    host = tiny_host(depth=4)
    vit.apply(host, cropr_reducers(depth=4, dim=C, r=2))
    host(torch.randn(2, 3, 32, 32))
    assert vit.tokens_after(host) == [15, 13, 11]
    vit.apply(host, cropr_reducers(depth=4, dim=C, r=2, llf=True))
    logits = host(torch.randn(2, 3, 32, 32))
    assert vit.tokens_after(host) == [15, 13, N] and torch.isfinite(logits).all()


def official_router(case: dict) -> TokenCropr:
    """A router with the fixture's weights, named as in the official ``Cropr`` module."""
    p = {k: tensor(v) for k, v in case["params"].items()}
    method = TokenCropr(
        case["dim"],
        case["r"],
        num_queries=case["num_queries"],
        num_heads=case["num_heads"],
        num_classes=case["num_classes"],
        fuse_last=True,
    )
    with torch.no_grad():
        method.queries.copy_(p["cross_attn.queries"][0])
        if case["num_classes"]:
            if case["num_heads"] > 1:
                method.proj.weight.copy_(p["cross_attn.proj.weight"])
                method.proj.bias.copy_(p["cross_attn.proj.bias"])
            method.mlp_norm.weight.copy_(p["cross_attn.mlp_norm.weight"])
            method.mlp_norm.bias.copy_(p["cross_attn.mlp_norm.bias"])
            for i, name in ((0, "fc1"), (2, "fc2")):
                method.mlp[i].weight.copy_(p[f"cross_attn.mlp.{name}.weight"])
                method.mlp[i].bias.copy_(p[f"cross_attn.mlp.{name}.bias"])
            for i, name in ((0, "norm"), (1, "head")):
                method.head[i].weight.copy_(p[f"head.{name}.weight"])
                method.head[i].bias.copy_(p[f"head.{name}.bias"])
    return method


@pytest.mark.parametrize(
    "case", GOLDEN["cases"], ids=lambda c: f"n{c['n']}-h{c['num_heads']}-m{c['num_queries']}"
)
def test_reproduces_the_official_cropr_golden_fixture(case):
    """The official ``Cropr.forward``: same kept tokens in the same (score) order, the same
    pruned tokens for LLF, and (training, one query) the same auxiliary logits."""
    x = tensor(case["x"])
    method, sig = official_router(case).eval(), signals(x)
    out = method(x, sig)
    assert torch.equal(out.index, torch.tensor(case["kept_index"]))
    torch.testing.assert_close(out.x, tensor(case["kept"]), atol=1e-5, rtol=1e-5)
    pruned = LastLayerFusion()(out.x, Signals(prefix=1, size=out.size, state=sig.state))
    torch.testing.assert_close(
        pruned.x[:, out.num_tokens :], tensor(case["pruned"]), atol=1e-5, rtol=1e-5
    )
    if case["num_classes"]:
        train_sig = signals(x)
        train = method.train()(x, train_sig)
        assert torch.equal(train.index, out.index)
        (aux,) = train_sig.state[AUX_KEY]
        torch.testing.assert_close(aux, tensor(case["aux_logits"]), atol=1e-5, rtol=1e-5)
