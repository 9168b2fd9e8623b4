"""MQT-LLaVA: a Matryoshka Query Transformer, whose first ``m`` of ``M`` queries are used.

Paper: "Matryoshka Query Transformer for Large Vision-Language Models",
https://arxiv.org/abs/2405.19315
Official code: https://github.com/gordonhu608/MQT-LLaVA,
``llava/model/multimodal_projector/builder.py``: ``Resampler``, built by
``build_matryoshka_query_transformer`` as LLaVA's ``query_abstractor``.

Algorithm (Sec. 3):
1. ``M = 256`` learned queries (a 16x16 grid, 2-D sin-cos positions added) at the vision width;
   only the first ``m`` (``num_visual_tokens``, any 1..M) are used: training draws ``m`` per step
   (``matryoshka_choice``), inference picks it, so one model serves every budget.
2. One multi-head cross-attention (LayerNorm on queries, keys and values): as the official code
   has it, the keys are the positional table resized to the patch grid, the values the features.
3. A bias-free ``[C_v, out_dim]`` matrix maps the ``m`` outputs to the LLM width: 576 patches
   (CLIP-L/336) to ``m`` tokens, 256 at most.

Deviations from the official code:
- ``pos_embed`` is a persistent buffer here, a frozen ``nn.Parameter`` there (same key and values;
  ``parameters()`` counts it there, not here). The official table is float16; its float16 values
  are kept here in the module's dtype.
- ``m`` is a constructor argument, a ``num_visual_tokens`` forward argument, or
  ``signals.state["num_visual_tokens"]``, in that order of precedence; forward never draws it
  (the official ``"second_stage"`` string draws ``random.choice(range(2, 258, 2))`` inside).
- The key positions are resized to ``signals.grid`` (the official forward fixes ``(24, 24)``:
  the same for LLaVA-1.5's 576 patches); resizing a table to its own size is skipped (a no-op).
- Weights: the checkpoint's ``model.query_abstractor.*`` keys load with that prefix removed.
- The official resampler is adapted from Qwen-VL's: its positional table and resize are
  ``reference.qwen_vl``'s (Qwen-VL's ``get_2d_sincos_pos_embed`` and ``get_abs_pos``).
"""

from __future__ import annotations

import math
import random
from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.qwen_vl import resize_pos_embed, sincos_pos_embed_2d
from reference.registry import register


def matryoshka_choice(num_queries: int = 256, rng: random.Random | None = None) -> int:
    """The training draw of ``m`` (the official ``"second_stage"``): an even count in 2..M."""
    return (rng or random).choice(range(2, num_queries + 2, 2))


@register
class MQTLLaVA(Projector):
    """The first ``num_visual_tokens`` queries cross-attend to the patches, then ``@ proj``."""

    catalog_id = "mqt_llava"
    kind = "resampling"
    count_argument = "num_visual_tokens"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {
            "in_dim": 32,
            "out_dim": 64,
            "num_queries": 9,
            "num_heads": 2,
            "num_visual_tokens": 6,
        },
    }
    invalid_configs = (
        ({"num_queries": 8}, "num_queries"),
        ({"num_visual_tokens": 10}, "num_visual_tokens"),
        ({"num_visual_tokens": 0}, "num_visual_tokens"),
        ({"num_heads": 3}, "num_heads"),
        ({"in_dim": 30}, "in_dim"),
    )

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        num_queries: int = 256,
        num_heads: int = 16,
        num_visual_tokens: int | None = None,
    ):
        super().__init__()
        side = math.isqrt(num_queries) if num_queries > 0 else 0
        if side < 1 or side * side != num_queries:
            raise ValueError(
                f"num_queries must be a positive square (a query grid), got {num_queries}"
            )
        if in_dim % 4:
            raise ValueError(
                f"in_dim must be a multiple of 4 (2-D sin-cos positions), got {in_dim}"
            )
        if num_heads < 1 or in_dim % num_heads:
            raise ValueError(f"num_heads must be a divisor of in_dim={in_dim}, got {num_heads}")
        self.num_queries = num_queries
        self.num_visual_tokens = self._check(
            num_queries if num_visual_tokens is None else num_visual_tokens
        )
        self.register_buffer("pos_embed", sincos_pos_embed_2d(in_dim, side, side).half().float())
        self.query = nn.Parameter(nn.init.trunc_normal_(torch.zeros(num_queries, in_dim), std=0.02))
        self.attn = nn.MultiheadAttention(in_dim, num_heads, batch_first=True)
        nn.init.trunc_normal_(self.attn.out_proj.weight, std=0.02)  # the official _init_weights
        nn.init.zeros_(self.attn.out_proj.bias)
        self.ln_q = nn.LayerNorm(in_dim, eps=1e-6)
        self.ln_k = nn.LayerNorm(in_dim, eps=1e-6)
        self.ln_v = nn.LayerNorm(in_dim, eps=1e-6)
        self.proj = nn.Parameter(out_dim**-0.5 * torch.randn(in_dim, out_dim))

    def _check(self, m: int) -> int:
        if not 1 <= m <= self.num_queries:
            raise ValueError(f"num_visual_tokens must be in 1..{self.num_queries}, got {m}")
        return m

    def num_tokens(self, n: int) -> int:
        return self.num_visual_tokens

    def forward(
        self, features: Tensor, signals: ProjectorSignals, num_visual_tokens: int | None = None
    ) -> Tensor:
        b, n, _ = features.shape
        m = num_visual_tokens or signals.state.get("num_visual_tokens") or self.num_visual_tokens
        m = self._check(m)
        grid = signals.grid if signals.grid[0] * signals.grid[1] == n else (math.isqrt(n),) * 2
        if grid[0] * grid[1] != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        pos = self.pos_embed.to(features.dtype)
        q = self.ln_q(self.query[:m] + pos[:m]).expand(b, -1, -1)  # [B, m, C_v]
        k = self.ln_k(resize_pos_embed(pos, grid)).expand(b, -1, -1)  # [B, N, C_v]: positions only
        out = self.attn(q, k, self.ln_v(features), need_weights=False)[0]
        return out @ self.proj
