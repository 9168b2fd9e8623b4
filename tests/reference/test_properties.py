"""Property tests of the contract over shapes, prefixes and budgets (hypothesis).

Every registered token reducer, on any batch (0-3), prefix (0-2), token count and
either of its test budgets: the budget is respected, the prefix is unchanged,
``index`` and ``assign`` agree, and each sample gets what it gets alone, on raw
tensors and through the ViT host. Examples are derandomised, so CI runs the same
cases every time; a failure shrinks to the smallest case that shows it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reference import registry
from reference.core import Reduction, Signals, TokenReducer
from reference.hosts import vit
from tests.reference.conftest import B, C, build, make_signals, tiny_host

ENTRIES = [e for e in registry.entries() if issubclass(e.cls, TokenReducer)]
IDS = [e.catalog_id for e in ENTRIES]
FEW = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def alone(signals: Signals, i: int) -> Signals:
    """The caller's signals of sample ``i`` (``make_signals`` fills every field)."""
    return Signals(
        prefix=signals.prefix,
        size=signals.size[i : i + 1],
        keys=signals.keys[i : i + 1],
        cls_attn=signals.cls_attn[i : i + 1],
        attn=signals.attn[i : i + 1],
        values=signals.values[i : i + 1],
        state={"text": signals.state["text"][i : i + 1]},
    )


def assert_keeps_the_contract(method: TokenReducer, x: torch.Tensor, prefix: int, out: Reduction):
    b, n, _ = x.shape
    k = out.x.shape[1]
    low, high = method.budget(n, prefix)
    assert low <= k <= high <= n, f"{k} tokens, budget ({low}, {high})"
    assert out.size.shape == (b, k, 1) and out.index.shape == (b, k)
    assert out.assign.shape == (b, n)
    assert torch.equal(out.x[:, :prefix], x[:, :prefix])
    assert (out.index[:, :prefix] == torch.arange(prefix)).all()
    assert ((out.index >= -1) & (out.index < n)).all()
    assert ((out.assign >= -1) & (out.assign < k)).all()
    continues = out.index >= 0  # an output token continuing an input token is its slot
    if out.mask is not None:
        continues &= out.mask > 0
    slots = torch.arange(k).expand(b, k)
    assert torch.equal(out.assign.gather(1, out.index.clamp(min=0))[continues], slots[continues])


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@FEW
@given(
    b=st.integers(0, 3),
    prefix=st.integers(0, 2),
    m=st.integers(0, 24),
    config=st.sampled_from(["zero", "some"]),
    seed=st.integers(0, 2**16),
)
@torch.no_grad()
def test_any_shape_prefix_and_budget_keeps_the_contract(entry, b, prefix, m, config, seed):
    assume(prefix + m >= 1)  # a sequence has at least one token
    x = torch.randn(b, prefix + m, C, generator=torch.Generator().manual_seed(seed))
    signals = make_signals(x, prefix, seed)
    method = build(entry.cls, config)
    positions = getattr(method, "zeta", None)  # ViT-Slim: built for a number of positions
    if positions is not None and prefix + m > positions.shape[0]:
        with pytest.raises(ValueError, match="num_tokens"):
            method(x, signals)
        return
    out = method(x, signals)
    assert_keeps_the_contract(method, x, prefix, out)
    for i in range(b):
        one = method(x[i : i + 1], alone(signals, i))
        real = slice(None) if out.mask is None else out.mask[i] > 0
        torch.testing.assert_close(out.x[i, real], one.x[0], rtol=1e-4, atol=1e-5)
        assert torch.equal(out.index[i, real], one.index[0])


HOST = tiny_host()


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@FEW
@given(
    b=st.integers(1, B),
    layers=st.sets(st.integers(0, 3), min_size=1, max_size=2),
    proportional=st.booleans(),
    seed=st.integers(0, 2**16),
)
@torch.no_grad()
def test_through_the_host_each_image_gets_what_it_gets_alone(entry, b, layers, proportional, seed):
    vit.apply(HOST, {layer: build(entry.cls, "some") for layer in layers}, proportional)
    images = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    together = HOST(images)
    assert torch.isfinite(together).all()
    for i in range(b):
        torch.testing.assert_close(together[i], HOST(images[i : i + 1])[0], rtol=1e-4, atol=1e-5)
