"""ViT-Slim's own invariants: soft masks in search, global monotone masks after it, and the
official patch-mask compression (golden fixture)."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals
from reference.hosts import vit
from reference.vit_slim import ViTSlim, compress, global_patch_masks, sparsity_loss
from tests.reference.conftest import N, tiny_host, tokens
from tests.reference.fixtures import load, tensor


def signals(x: torch.Tensor, prefix: int = 1) -> Signals:
    return Signals(prefix=prefix, size=torch.ones(x.shape[0], x.shape[1], 1))


def seeded(num_layers: int, keep: float = 1.0) -> list[ViTSlim]:
    gen = torch.Generator().manual_seed(0)
    reducers = [ViTSlim(N, keep) for _ in range(num_layers)]
    for r in reducers:
        r.zeta.data = torch.randn(N, generator=gen)
    return reducers


def test_search_keeps_tokens_and_returns_tanh_mask():
    x, (method,) = tokens(), seeded(1)
    out = method.train()(x, signals(x))
    assert torch.equal(out.x, x)
    torch.testing.assert_close(out.mask[:, 1:], torch.tanh(method.zeta)[1:].expand(3, -1))
    assert (out.mask[:, 0] == 1).all()
    (out.mask.sum() + sparsity_loss([method])).backward()
    assert method.zeta.grad is not None and method.zeta.grad.abs().sum() > 0


def test_eval_keeps_top_fraction_of_zeta():
    x, (method,) = tokens(), seeded(1, keep=0.25)
    out = method.eval()(x, signals(x))
    expected = method.zeta[1:].topk(4).indices + 1
    assert out.num_tokens == 1 + 4
    assert (out.index[:, 1:] == expected.sort().values).all()


def test_global_masks_meet_budget_and_shrink_with_depth():
    z = torch.tanh(torch.randn(4, 10, generator=torch.Generator().manual_seed(1)))
    masks = global_patch_masks(z, budget=0.3)
    raw = z >= z.flatten().sort().values[int(0.7 * z.numel())]
    assert raw.sum() == 12  # the budget before the depth constraint
    assert (masks >= raw).all()  # nothing above the threshold is dropped
    assert (masks[:-1] >= masks[1:]).all()  # kept in layer l+1 => kept in layer l
    assert torch.equal(masks[-1], raw[-1])


def test_compressed_masks_drive_the_host_by_original_position():
    reducers = seeded(4)
    compress(reducers, budget=0.4)
    host = tiny_host(depth=4)
    vit.apply(host, {layer: r.eval() for layer, r in enumerate(reducers)})
    host(torch.randn(2, 3, 32, 32))
    expected = [1 + int(r.searched[1:].sum()) for r in reducers]
    assert vit.tokens_after(host) == expected
    # The last layer's kept positions are exactly its mask (positions followed).
    x = tokens()
    sig = signals(x)
    for r in reducers:
        out = r.eval()(x, sig)
        x, sig = out.x, Signals(prefix=1, size=out.size, state=sig.state)
    kept = sig.state["vit_slim.positions"][0, 1:]
    assert torch.equal(kept, reducers[-1].searched[1:].nonzero()[:, 0] + 1)


@pytest.mark.parametrize("case", load("vit_slim")["cases"], ids=lambda c: f"budget{c['budget']}")
def test_reproduces_the_official_patch_compression_golden_fixture(case):
    """The official ``compress_patch`` (one threshold over every layer's ``tanh(zeta)``, then
    OR from the deepest layer up), ties at the init value included; in eval each layer then
    keeps exactly the positions of its mask (the CLS token always)."""
    zeta = tensor(case["zeta"])  # [L, P]
    num_layers, p = zeta.shape
    reducers = [ViTSlim(p) for _ in range(num_layers)]
    for r, z in zip(reducers, zeta, strict=True):
        r.zeta.data = z.clone()
    compress(reducers, budget=case["budget"])
    official = torch.tensor(case["masks"], dtype=torch.bool)
    assert torch.equal(torch.stack([r.searched for r in reducers]), official)
    x = torch.randn(2, p, 8, generator=torch.Generator().manual_seed(0))
    sig = signals(x)
    for r, mask in zip(reducers, official, strict=True):
        out = r.eval()(x, sig)
        x, sig = out.x, Signals(prefix=1, size=out.size, state=sig.state)
        kept = sig.state.get("vit_slim.positions", torch.arange(p).expand(2, -1))[:, 1:]
        assert torch.equal(kept, (mask[1:].nonzero()[:, 0] + 1).expand(2, -1))
