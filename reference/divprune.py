"""DivPrune: keep the most diverse visual tokens, a greedy max-min selection.

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
https://arxiv.org/abs/2503.02175
Official code: https://github.com/vbdi/divprune
(``LLaVA/llava/model/llava_arch.py``: ``LlavaMetaForCausalLM.DivPrune`` and
``pairwise_cosine_similarity``, called from ``prepare_inputs_labels_for_multimodal``
with ``LAYER_INDEX=0``, ``SUBSET_RATIO=0.098``; read at commit 799e2d9)

Algorithm (Sec. 3, the max-min diversity problem solved greedily):
1. Distances between the ``M`` visual tokens: ``d(i, j) = 1 - cos(v_i, v_j)``.
2. The first token is the one whose nearest other token is farthest away.
3. Each next token is the one whose distance to the nearest selected token is the
   largest, until ``round(ratio * M)`` tokens are selected (LLaVA-1.5: 56 of 576).
4. The language model sees the selected tokens in their original order.

Deviations from the official code:
- Mapping onto the host: a vision-stage ``TokenReducer`` at the LLaVA host's
  selected vision layer (``LlavaHost.apply(vision=...)``), CLS as protected prefix
  (the host drops it afterwards). The official code measures distances between the
  projected tokens (the language model's input embeddings); the hook sees the
  tower's features before the MLP projector, so by default they are projected with
  the host's projector (``Signals.projector``, given by the LLaVA hosts) and the
  distances are measured where the official code measures them. ``project``
  overrides it; without either (the ViT host) distances are measured on the
  features. The kept tokens are the same features either way.
- Per sample: the official code selects on batch item 0 (``new_input_embeds[0]``,
  at the hard-coded image offset 35) and applies those indices to the whole batch;
  here every sample selects its own tokens, and empty slots an earlier reduction
  padded with (``Signals.present``) are left out.
- A token already selected is never selected again. The official loop does not
  exclude them; it can pick one again only when every remaining token lies within
  floating-point noise of the selected set (exact duplicates), and would then feed
  the same token twice.
- All ``prefix`` tokens are protected and excluded from the selection. ``ratio=1``
  (or a budget covering every token) returns the tokens unchanged. Left out: the
  LLaVA-1.6 any-resolution and video paths, and ``LAYER_INDEX > 0`` (selection
  inside the language model, which the released script does not use).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity, keep_tokens
from reference.ops import each_present_sample
from reference.registry import register


def kept_count(ratio: float, m: int) -> int:
    """Tokens selected from ``m``: the official ``int(round(ratio * m))`` (half to even)."""
    return min(m, round(ratio * m))


@torch.no_grad()
def divprune_select(features: Tensor, k: int) -> Tensor:
    """Greedy max-min diverse subset of each sample's tokens.

    Args:
        features: ``[B, M, C]`` the tokens whose cosine distances decide.
        k: tokens to select, ``0 <= k <= M`` (``M >= 2`` when ``k > 0``).

    Returns:
        ``[B, k]`` indices into ``M``, in the order they were selected.
    """
    b, m, _ = features.shape
    unit = features / features.norm(dim=-1, keepdim=True)
    dist = 1.0 - unit @ unit.mT  # [B, M, M]; row: selected token, column: candidate
    chosen = torch.zeros(b, m, dtype=torch.bool, device=features.device)
    picks = torch.empty(b, k, dtype=torch.long, device=features.device)
    if k == 0:
        return picks
    # Step 2: each column's second-smallest distance (its smallest is to itself).
    nearest = dist.topk(2, dim=1, largest=False).values[:, 1]  # [B, M]
    rows = torch.arange(b, device=features.device)
    for i in range(k):
        pick = nearest.masked_fill(chosen, -torch.inf).argmax(dim=1)  # [B]
        picks[:, i] = pick
        chosen[rows, pick] = True
        # Step 3: distance of each candidate to its nearest selected token so far.
        row = dist[rows, pick]  # [B, M]
        nearest = row if i == 0 else torch.minimum(nearest, row)
    return picks


def divprune(
    x: Tensor,
    size: Tensor,
    prefix: int,
    ratio: float,
    project: Callable[[Tensor], Tensor] | None = None,
) -> Reduction:
    """Keep the prefix and the ``round(ratio * M)`` most diverse of the ``M`` other tokens.

    Args:
        x: ``[B, N, C]`` tokens (vision features at the hook).
        size: ``[B, N, 1]`` token sizes.
        prefix: protected tokens at the front.
        ratio: fraction of the non-prefix tokens kept (the official ``SUBSET_RATIO``).
        project: maps ``[B, M, C]`` to the features distances are measured on
            (None: ``x`` itself).

    Returns:
        A ``Reduction``: prefix, then the kept tokens in their original order.
    """
    m = x.shape[1] - prefix
    k = kept_count(ratio, m)
    if k >= m:
        return identity(x, size)
    if x.shape[0] == 0:
        return empty_batch(x, size, prefix + k)
    with torch.no_grad():
        patches = x[:, prefix:]
        features = patches if project is None else project(patches)
        keep = divprune_select(features, k) + prefix  # [B, k]
    return keep_tokens(x, size, prefix, keep)


@register
class DivPrune(TokenReducer):
    """Keep ``ratio`` of the image tokens, the greedy max-min diverse subset."""

    catalog_id = "divprune"
    kind = "pruning"
    needs = frozenset()
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {"zero": {"ratio": 1.0}, "some": {"ratio": 0.5}}

    def __init__(self, ratio: float = 0.098, project: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self.ratio = ratio
        # Kept out of the module tree: the projector belongs to the host, not to this method.
        self.__dict__["project"] = project

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        # round((keep / n) * n) == keep: the official ratio that keeps ``keep`` tokens.
        return {"vision": cls(ratio=keep / n_image)}

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        out = prefix + kept_count(self.ratio, n - prefix)
        return out, out

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        present = signals.present
        if present is not None and x.shape[0] and not bool(present.all()):
            return each_present_sample(
                x,
                signals.size,
                present,
                lambda i, t: divprune(
                    x[i : i + 1, t],
                    signals.size[i : i + 1, t],
                    signals.prefix,
                    self.ratio,
                    self.project if self.project is not None else signals.projector,
                ),
            )
        project = self.project if self.project is not None else signals.projector
        return divprune(x, signals.size, signals.prefix, self.ratio, project)
