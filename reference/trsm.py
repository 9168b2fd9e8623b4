"""TRSM: Token Reduction via Semantic Match (arXiv v1; the catalog now calls it PAR).

Paper: "Retrieval Replace Reduction: An effective visual token reduction method via
semantic match" (v1 of https://arxiv.org/abs/2410.07278; v2 is retitled "PAR:
Prompt-Aware Token Reduction Method for Efficient Large Multimodal Models")
Official code: none published (the catalog lists none).

Algorithm (v1, which this module follows):
1. The text prompt is the query: every prompt token is a query vector.
2. Every visual token is matched against the queries by cosine similarity; a
   visual token's relevance is its best match over the prompt tokens.
3. The ``1 - ratio`` most relevant visual tokens are retrieved (kept, in their
   original order) and handed to the language model with the text tokens; the
   rest are dropped (the paper reports ``ratio = 0.2`` on LLaVA-1.5).

Deviations from the paper:
- Basis: no official code exists and the v1 method section could not be read
  here; this follows the v1 abstract (text prompt as query vectors, retrieve the
  most similar visual tokens, keep them with the text). The max-over-queries
  relevance is our reading of "retrieve the most similar vectors" for a
  multi-token prompt.
- v2 (PAR) adds a second stage, a graph-based clustering / token-routing step
  that removes redundancy among the retrieved tokens, and an adaptive budget;
  neither is implemented (v1 has only the retrieval step).
- Hook: the LLaVA host's vision hook (the selected ViT layer, before the
  projector), so the match runs in the vision feature space; the paper matches
  the projected visual tokens with the prompt embeddings. The caller provides the
  prompt features already mapped into the vision feature space as
  ``signals.state["text"] [B, T, C]`` (and optionally
  ``signals.state["text_mask"] [B, T]``, False for padding); we have no text
  encoder or embedding table to map them ourselves.
- Without ``state["text"]`` (a plain ViT host), the CLS token is the query: an
  image-only fallback that is not in the paper.
- Prefix tokens (CLS) are never dropped and not scored.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, identity, keep_tokens
from reference.registry import register


def text_relevance(visual: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
    """Best cosine similarity of each visual token to any prompt token.

    Args:
        visual: ``[B, M, C]`` visual tokens.
        text: ``[B, T, C]`` prompt tokens (the retrieval queries).
        text_mask: ``[B, T]`` False for padding prompt tokens, or None.

    Returns:
        ``[B, M]`` relevance, float32.
    """
    with torch.no_grad():
        v = F.normalize(visual.float(), dim=-1)
        t = F.normalize(text.float(), dim=-1)
        sim = v @ t.transpose(-1, -2)  # [B, M, T]
        if text_mask is not None:
            sim = sim.masked_fill(~text_mask[:, None, :].bool(), -torch.inf)
        return sim.max(dim=-1).values


def retrieve(
    x: Tensor, size: Tensor, prefix: int, text: Tensor, keep: int, text_mask: Tensor | None = None
) -> Reduction:
    """Keep the prefix and the ``keep`` non-prefix tokens most similar to ``text``."""
    relevance = text_relevance(x[:, prefix:], text, text_mask)  # [B, M]
    top = relevance.topk(keep, dim=1).indices + prefix  # [B, keep]
    return keep_tokens(x, size, prefix, top)


@register
class TRSM(TokenReducer):
    """Drop ``ratio`` of the visual tokens least similar to the text prompt."""

    catalog_id = "trsm"
    kind = "pruning"
    needs = frozenset()
    basis = "abstract of arXiv v1 only (no official code; method section unavailable)"
    test_configs: ClassVar[dict[str, dict]] = {"zero": {"ratio": 0.0}, "some": {"ratio": 0.5}}

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        return {"vision": cls(ratio=1 - keep / n_image)}

    def __init__(self, ratio: float = 0.2):
        super().__init__()
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio

    def kept(self, m: int) -> int:
        return m - round(m * self.ratio)

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        k = prefix + self.kept(n - prefix)
        return k, k

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        prefix = signals.prefix
        m = x.shape[1] - prefix
        keep = self.kept(m)
        if keep >= m:
            return identity(x, signals.size)
        text = signals.state.get("text")
        mask = signals.state.get("text_mask")
        if text is None:  # image-only fallback: the CLS token is the query
            text, mask = x[:, :1], None
        return retrieve(x, signals.size, prefix, text, keep, mask)
