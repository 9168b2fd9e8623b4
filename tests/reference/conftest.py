"""Tiny inputs and signals for the reference implementation tests."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals, TokenReducer
from reference.vit import VisionTransformer

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
