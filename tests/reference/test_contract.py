"""The contract every registered method keeps (one parametrised test per rule)."""

from __future__ import annotations

import pytest
import torch

from reference import registry
from reference.core import TokenReducer
from reference.hosts import vit
from tests.reference.conftest import (
    B,
    N,
    assert_cached_decoding_matches,
    build,
    llava_inputs,
    make_signals,
    tiny_host,
    tokens,
)

# Methods that act on a token sequence with protected prefix tokens (ViT blocks, or
# the LLaVA host's vision tower); language-model methods have their own contract.
ENTRIES = [e for e in registry.entries() if issubclass(e.cls, TokenReducer)]
IDS = [e.catalog_id for e in ENTRIES]


@pytest.fixture(params=ENTRIES, ids=IDS)
def entry(request):
    return request.param


def run(method, x, prefix=1, seed=0):
    return method(x, make_signals(x, prefix, seed))


def test_budget_is_respected(entry, x):
    method = build(entry.cls, "some")
    out = run(method, x)
    low, high = method.budget(N, 1)
    assert low <= out.x.shape[1] <= high < N
    assert out.size.shape == (B, out.x.shape[1], 1) and out.index.shape == out.x.shape[:2]
    assert out.assign.shape == (B, N)
    assert torch.isfinite(out.x).all()


def test_zero_budget_is_identity(entry, x):
    out = run(build(entry.cls, "zero"), x)
    torch.testing.assert_close(out.x, x)
    assert out.x.shape == x.shape


def test_keeps_all_is_claimed_only_where_the_method_is_the_identity(entry, x):
    """The hosts skip a method whose ``keeps_all`` is True (no signals, no call): that is
    safe only if running it would return every token unchanged and in place."""
    for config in ("zero", "some"):
        method = build(entry.cls, config)
        if method.keeps_all(N, 1):
            out = run(method, x)
            torch.testing.assert_close(out.x, x)
            assert (out.index == torch.arange(N)).all() and (out.assign == torch.arange(N)).all()
            torch.testing.assert_close(out.size, torch.ones_like(out.size))


def test_a_method_that_keeps_all_is_not_run_and_still_traced(monkeypatch):
    """ToMe at r = 0: no keys are computed and ToMe is never called, yet the trace has one
    identity per block, and the logits are the plain host's."""
    from reference.tome import ToMe

    host, images = tiny_host(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = host(images)
        asked = []
        attend = vit.attend
        monkeypatch.setattr(vit, "attend", lambda *a, **k: (asked.append(a[5]), attend(*a, **k))[1])
        monkeypatch.setattr(ToMe, "forward", lambda *a: pytest.fail("ToMe ran at r = 0"))
        vit.apply(host, {i: ToMe(r=0) for i in range(len(host.blocks))}, True)
        torch.testing.assert_close(host(images), plain, rtol=0, atol=0)
    assert asked and all(not needs for needs in asked)
    assert vit.tokens_after(host) == [N] * len(host.blocks)


@pytest.mark.parametrize("prefix", [1, 2])
def test_prefix_tokens_stay_in_place(entry, prefix):
    x = tokens()
    out = run(build(entry.cls, "some"), x, prefix=prefix)
    torch.testing.assert_close(out.x[:, :prefix], x[:, :prefix])
    assert (out.index[:, :prefix] == torch.arange(prefix)).all()


def test_batch_items_get_the_result_they_get_alone(entry, x):
    method = build(entry.cls, "some")
    signals = make_signals(x)
    together = method(x, signals)
    for i in range(B):
        alone_signals = type(signals)(
            prefix=1,
            size=signals.size[i : i + 1],
            keys=signals.keys[i : i + 1],
            cls_attn=signals.cls_attn[i : i + 1],
            attn=signals.attn[i : i + 1],
            values=signals.values[i : i + 1],
            # Only the caller-provided signals (a method may add its own state).
            state={key: value[i : i + 1] for key, value in make_signals(x).state.items()},
        )
        alone = method(x[i : i + 1], alone_signals)
        n = alone.x.shape[1]
        torch.testing.assert_close(together.x[i, :n], alone.x[0], rtol=1e-4, atol=1e-5)


def test_inputs_are_not_mutated(entry, x):
    signals = make_signals(x)
    before = [t.clone() for t in (x, signals.size, signals.keys, signals.attn)]
    run(build(entry.cls, "some"), x)
    build(entry.cls, "some")(x, signals)
    for old, new in zip(before, (x, signals.size, signals.keys, signals.attn), strict=True):
        assert torch.equal(old, new)


def test_bfloat16(entry):
    x = tokens(torch.bfloat16)
    method = build(entry.cls, "some").to(torch.bfloat16)
    out = run(method, x)
    assert out.x.dtype == torch.bfloat16 and torch.isfinite(out.x.float()).all()


def test_gradients_reach_trainable_parts(entry, x):
    method = build(entry.cls, "some").train()
    params = [p for p in method.parameters() if p.requires_grad]
    x = x.clone().requires_grad_(True)
    out = run(method, x)
    (out.x.float().square().mean() + (out.mask.sum() if out.mask is not None else 0)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for p in params:
        assert p.grad is not None, "a trainable parameter gets no gradient"


def test_host_with_zero_budget_equals_plain_host(entry):
    host = tiny_host()
    images = torch.randn(2, 3, 32, 32)
    plain = host(images)
    vit.apply(host, {layer: build(entry.cls, "zero") for layer in range(4)})
    torch.testing.assert_close(host(images), plain)


def test_host_with_budget_runs_and_reduces(entry):
    host = tiny_host()
    vit.apply(host, {1: build(entry.cls, "some")}, proportional_attn=True)
    logits = host(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert vit.tokens_after(host)[0] < N


@torch.no_grad()
def test_runs_as_the_llava_hosts_vision_stage_with_a_consistent_cache(entry):
    """Any token reducer can prune the vision tower's output; decoding with the
    cache it leaves equals recomputing the sequence without a cache."""
    from reference.hosts.llava import TINY, LlavaHost

    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=build(entry.cls, "some"))
    state = {"text": torch.randn(3, 4, TINY.vision["embed_dim"])}
    keys = assert_cached_decoding_matches(host, *llava_inputs(), state=state)
    assert keys < 2 + 16 + 5


def _images(b: int = B, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("proportional", [False, True], ids=["plain", "proportional"])
@torch.no_grad()
def test_host_logits_of_a_sample_do_not_depend_on_its_batch_mates(entry, proportional):
    """Reducing at two blocks, each image's logits equal those it gets alone: the
    empty slots that pad variable counts are masked out of every attention."""
    host = tiny_host()
    reducers = {1: build(entry.cls, "some"), 2: build(entry.cls, "some")}
    vit.apply(host, reducers, proportional_attn=proportional)
    images = _images()
    together = host(images)
    for i in range(B):
        alone = host(images[i : i + 1])
        torch.testing.assert_close(together[i], alone[0], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_llava_vision_stage_logits_of_a_sample_do_not_depend_on_its_batch_mates(entry):
    from reference.hosts.llava import TINY, LlavaHost

    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=build(entry.cls, "some"))
    text = torch.randn(B, 4, TINY.vision["embed_dim"])
    images, prefix, suffix, valid = llava_inputs()
    together, _ = host.prefill(images, prefix, suffix, valid, state={"text": text})
    for i in range(B):
        n = int(valid[i].sum())
        alone, _ = host.prefill(
            images[i : i + 1],
            prefix[i : i + 1],
            suffix[i : i + 1, :n],
            valid[i : i + 1, :n],
            state={"text": text[i : i + 1]},
        )
        torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)
