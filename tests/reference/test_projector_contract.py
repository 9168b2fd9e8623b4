"""The contract every registered projector method keeps (one parametrised test per rule)."""

from __future__ import annotations

import pytest
import torch

from reference import registry
from reference.hosts.llava import TINY, LlavaHost
from reference.projector import Projector, ProjectorSignals
from tests.reference.conftest import assert_cached_decoding_matches, llava_inputs

ENTRIES = [e for e in registry.entries() if issubclass(e.cls, Projector)]
N, GRID = 16, (4, 4)  # TINY: 32 px images, 8 px patches
C_V, HIDDEN = TINY.vision["embed_dim"], TINY.hidden


def build(entry, dtype=torch.float32) -> Projector:
    torch.manual_seed(0)
    return entry.cls(**entry.cls.test_configs["some"]).eval().to(dtype)


def features(
    b: int = 3, dtype=torch.float32, seed: int = 0
) -> tuple[torch.Tensor, ProjectorSignals]:
    g = torch.Generator().manual_seed(seed)
    layers = tuple(torch.randn(b, 1 + N, C_V, generator=g).to(dtype) for _ in range(2))
    text = torch.randn(b, 4, C_V, generator=g).to(dtype)
    return layers[-1][:, 1:], ProjectorSignals(layers=layers, grid=GRID, state={"text": text})


pytestmark = pytest.mark.skipif(not ENTRIES, reason="no projector method is registered yet")


@pytest.fixture(params=ENTRIES, ids=[e.catalog_id for e in ENTRIES])
def entry(request):
    return request.param


def test_output_has_the_declared_count_and_width(entry):
    method = build(entry)
    x, signals = features()
    out = method(x, signals)
    m = method.num_tokens(N)
    assert out.shape == (3, m, HIDDEN) and m < N
    assert torch.isfinite(out).all()


def test_each_sample_gets_what_it_gets_alone(entry):
    method = build(entry)
    x, signals = features()
    together = method(x, signals)
    for i in range(3):
        alone = ProjectorSignals(
            layers=tuple(t[i : i + 1] for t in signals.layers),
            grid=signals.grid,
            state={"text": signals.state["text"][i : i + 1]},
        )
        torch.testing.assert_close(
            together[i], method(x[i : i + 1], alone)[0], rtol=1e-4, atol=1e-5
        )


def test_gradients_reach_every_parameter(entry):
    method = build(entry).train()
    x, signals = features()
    x.requires_grad_(True)
    method(x, signals).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in method.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"


def test_bfloat16(entry):
    method = build(entry, torch.bfloat16)
    x, signals = features(dtype=torch.bfloat16)
    out = method(x, signals)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_a_setting_the_paper_cannot_express_is_refused_naming_the_argument(entry):
    assert entry.cls.invalid_configs, "list the invalid settings in invalid_configs"
    for kwargs, name in entry.cls.invalid_configs:
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            entry.cls(**{**entry.cls.test_configs["some"], **kwargs})


@torch.no_grad()
def test_replaces_the_llava_hosts_projector_with_a_consistent_cache(entry):
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(projector=build(entry))
    state = {"text": torch.randn(3, 4, C_V)}
    keys = assert_cached_decoding_matches(host, *llava_inputs(), state=state)
    assert keys == 2 + build(entry).num_tokens(N) + 5
