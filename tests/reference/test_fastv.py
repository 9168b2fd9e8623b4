"""FastV against its official pruning step (``fastv_kvcache.py``, batch 1)."""

from __future__ import annotations

import torch

from reference.fastv import FastV
from reference.hosts.llava import LLMSignals
from tests.reference.fixtures import load, tensor


def test_keeps_the_official_tokens():
    """The official layer-K step; image tokens 35..611 of 640 (see the fixture)."""
    fx = load("fastv")
    last_attn = tensor(fx["last_attn"])[None]  # [1, H, N]
    n = last_attn.shape[-1]
    h = torch.randn(1, n, 8)
    signals = LLMSignals(
        image_start=35, image_len=576, valid=torch.ones(1, n, dtype=torch.bool), last_attn=last_attn
    )
    out = FastV(ratio=0.5)(h, signals)
    assert out.index[0].tolist() == fx["keep"]
    torch.testing.assert_close(out.x, h[:, fx["keep"]])
