"""Tiny inputs and signals for the reference implementation tests."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals, TokenReducer
from reference.hosts.vit import VisionTransformer

B, N, C, H = 3, 1 + 16, 32, 4  # batch, tokens (CLS + 4x4 patches), channels, heads


def make_signals(x: torch.Tensor, prefix: int = 1, seed: int = 0) -> Signals:
    """Every signal a method may need, consistent with one random attention layer."""
    gen = torch.Generator().manual_seed(seed)
    b, n, c = x.shape
    keys = torch.randn(b, H, n, c // H, generator=gen).to(x)
    queries = torch.randn(b, H, n, c // H, generator=gen).to(x)
    attn = ((queries @ keys.transpose(-1, -2)) / (c // H) ** 0.5).softmax(-1)  # [B, H, N, N]
    # External signals a caller provides through ``state``: text features in the
    # vision feature space (text-guided VLM methods), one row per text token.
    state = {"text": torch.randn(b, 4, c, generator=gen).to(x)}
    return Signals(
        state=state,
        prefix=prefix,
        size=torch.ones(b, n, 1, dtype=x.dtype),
        keys=keys.mean(1),
        cls_attn=attn[:, :, 0],
        attn=attn,
        values=torch.randn(b, H, n, c // H, generator=gen).to(x),
    )


def tiny_host(depth: int = 4, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=C, depth=depth, num_heads=H, num_classes=10
    ).eval()


def tokens(dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def x() -> torch.Tensor:
    return tokens()


def build(cls: type[TokenReducer], config: str) -> TokenReducer:
    torch.manual_seed(0)
    return cls(**cls.test_configs[config]).eval()


def llava_inputs(seed: int = 0, dtype=torch.float32):
    """A padded batch for ``LlavaHost(TINY)``: 3 images, a 2-token prefix, a 5-token
    instruction of which samples 1 and 2 use 3 and 4 tokens."""
    from reference.hosts.llava import TINY

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 32, 32, generator=g).to(dtype)
    prefix = torch.randint(0, TINY.vocab, (B, 2), generator=g)
    suffix = torch.randint(0, TINY.vocab, (B, 5), generator=g)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    return images, prefix, suffix, valid


@torch.no_grad()
def assert_cached_decoding_matches(host, images, prefix, suffix, valid, state=None) -> int:
    """Prefill, decode one token with the cache, and check it against recomputing the
    pruned sequence without a cache (the recorded reductions replayed).

    Returns the number of keys the first decoder layer cached in prefill.
    """
    logits, cache = host.prefill(images, prefix, suffix, valid, state=dict(state or {}))
    cached_keys = cache["layers"][0]["k"].shape[2]
    token = logits.argmax(-1)
    cached = host.decode(token, cache)
    recomputed, _ = host.prefill(
        images,
        prefix,
        suffix,
        valid,
        extra_ids=token[:, None],
        replay=host.last_trace,
        state=dict(state or {}),
    )
    torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)
    return cached_keys
