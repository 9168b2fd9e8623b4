"""FastV: drop the image tokens that the last instruction token attends to least.

Paper: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", https://arxiv.org/abs/2403.06764
Official code: https://github.com/pkunlp-icler/FastV
(``src/FastV/lmms-eval/fastv_kvcache.py``, ``FastVLlamaModel.forward``, the KV-cache
version; also ``src/transformers/src/transformers/models/llama/modeling_llama.py``;
read at commit d165972)

Algorithm (Sec. 4):
1. Run layers ``0 .. K-1`` on the full sequence.
2. Score each image token by the attention it receives from the last token of
   the prompt in layer ``K-1``, averaged over heads.
3. Keep the top ``(1 - R)`` of the image tokens (in their original order) and
   every text token; layers ``K ..`` and decoding see only those.

Deviations from the official code:
- Attach it at ``llm[K - 1]``: the host's hook runs after a layer, with that
  layer's attention; the official code prunes on entering layer ``K`` (``K = 3``,
  keep ratio 0.5, hard-coded in ``fastv_kvcache.py``; the paper's default is K = 2).
- Tokens are removed, as in ``fastv_kvcache.py`` and the inplace variant of the
  official ``modeling_llama.py`` (which has no KV cache); that file's default,
  non-inplace variant keeps every token and masks the pruned image tokens out of
  the attention of the later layers instead. Only the last valid token's
  attention row is computed (``last_attn``), instead of full eager attention maps.
- Batched: every sample uses its own last valid token and keeps its own top-k;
  the official code reads batch item 0 (``last_attention.mean(1)[0][-1]``, the
  last position, padded or not) for the whole batch, and hard-codes LLaVA-1.5's
  image span (tokens 35 to 611).
- The kept count is ``n - round(n * R)``; the official code keeps
  ``int(n * keep)`` (the same for R = 0.5, off by one for some other ratios).
- Kept tokens keep their original position ids, as in the official code.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction
from reference.hosts.llava import LLMReducer, LLMSignals
from reference.ops import keep_image_tokens
from reference.registry import register


@register
class FastV(LLMReducer):
    """Prune ``ratio`` of the image tokens after this layer (the paper's ``R``)."""

    catalog_id = "fastv"
    kind = "pruning"
    needs = frozenset({"last_attn"})
    test_configs: ClassVar[dict[str, dict]] = {"zero": {"ratio": 0.0}, "some": {"ratio": 0.5}}

    def __init__(self, ratio: float = 0.5):
        super().__init__()
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        # The paper's K = 2: prune after layer 1 (0-based), from that layer's attention.
        return {"llm": {1: cls(ratio=1 - keep / n_image)}}

    @classmethod
    def paper_placement(cls, num_layers: int, **kwargs) -> dict[int, FastV]:
        # K = 2: prune after decoder layer 1 (0-based), from that layer's attention.
        return {1: cls(**kwargs)} if num_layers > 2 else {}

    def kept(self, image_len: int) -> int:
        return image_len - round(image_len * self.ratio)

    def image_budget(self, n_image: int) -> tuple[int, int]:
        return self.kept(n_image), self.kept(n_image)

    def forward(self, h: Tensor, signals: LLMSignals) -> Reduction:
        start, length = signals.image_start, signals.image_len
        with torch.no_grad():
            scores = signals.last_attn.mean(1)[:, start : start + length]  # [B, Nv]
            keep = scores.topk(self.kept(length), dim=1).indices
        return keep_image_tokens(h, None, start, length, keep)
