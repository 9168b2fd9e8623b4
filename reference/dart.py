"""DART: keep the image tokens that duplicate the pivot tokens least.

Paper: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", https://arxiv.org/abs/2502.11494
Official code: https://github.com/ZichenWen1/DART
(``llava/model/language_model/modeling_llama_self.py``: ``DART.get_retained_image_token``,
called from ``DART.forward`` on entering decoder layer ``K = 2``; defaults from
``llava/eval/model_vqa_loader.py``; read at commit 5a19452, the official author's last
commit, through the fork xqy1111111/DART: the official repository was not reachable)

Algorithm (Sec. 3, at the input of layer ``K``, from layer ``K - 1``'s output):
1. Pivots: the ``pivot_image`` image tokens and the ``pivot_text`` tokens after the
   image whose layer ``K - 1`` keys (all heads, after RoPE) have the largest L1 norm.
2. Per pivot, in turn: of the image tokens not yet kept, keep the ``t`` whose hidden
   states (after the model's final norm) are least cosine-similar to the pivot's;
   ``t = (tokens // (pivot_image + pivot_text))`` (``tokens``: the official
   ``max_num_trunction``, 128; or ``image_len * (1 - ratio)`` when it is None).
3. Keep the image pivots and every token a pivot kept (LLaVA-1.5 default: 4 + 8 * 16
   = 132 of 576), in order; text tokens all stay, kept tokens keep their positions.

Deviations from the official code:
- Mapping onto the host: an ``LLMReducer`` at ``llm[K - 1]`` (``paper_placement``),
  after the layer whose output the official code reads. The hidden states are put
  through the language model's final norm, as in the official code: ``norm`` if
  given, else the host's (``LLMSignals.final_norm``), else as they are.
- Keys: the host gives the layer's keys after RoPE (``LLMSignals.keys``,
  ``[B, H_kv, N, D]``), which rank the pivots as in the official code. Where a host
  gives none, the pivots are ranked by the L1 norm of the layer's output hidden
  states instead, a stand-in that picks other pivots.
- Pivot order: the official loop visits the pivots in CPython's iteration order of
  the set of their sequence positions; kept here (positions are those of the host's
  sequence, as in the official one when the prompt layout is LLaVA-1.5's), as the
  tokens one pivot takes are not available to the next.
- Per sample, with the image span's valid tokens and each sample's valid text: the
  official code is batch-1 (it asserts it) and takes every token after the image as
  text. Budgets the official code cannot run (fewer image or text tokens than
  pivots, fewer candidates than ``t``) take what there is; samples must end with
  equal counts (a ``ValueError`` says when they would not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction
from reference.hosts.llava import LLMReducer, LLMSignals
from reference.ops import keep_image_tokens
from reference.registry import register


def official_pivot_order(pivots: list[int]) -> list[int]:
    """The order the official loop visits pivots at sequence positions ``pivots``
    (image pivots first, then text, each by descending key norm): it iterates a set."""
    return list(set(pivots))


@torch.no_grad()
def dart_keep(
    hidden: Tensor,
    key_norm: Tensor,
    image: Tensor,
    text: Tensor,
    pivot_image: int,
    pivot_text: int,
    per_pivot: int,
) -> list[int]:
    """The image tokens DART keeps for one sample.

    Args:
        hidden: ``[N, C]`` hidden states whose cosines decide (after the final norm).
        key_norm: ``[N]`` the pivot score of every token (L1 norm of its keys).
        image: ``[M]`` sequence positions of the sample's image tokens, ascending.
        text: ``[T]`` sequence positions of its text tokens after the image, ascending.
        pivot_image, pivot_text: pivots taken from each.
        per_pivot: image tokens each pivot keeps (``t``).

    Returns:
        The kept sequence positions: image pivots, then what each pivot kept.
    """
    top_image = key_norm[image].topk(min(pivot_image, len(image))).indices
    top_text = key_norm[text].topk(min(pivot_text, len(text))).indices
    image_pivots = image[top_image].tolist()
    pivots = image_pivots + text[top_text].tolist()
    candidate = torch.ones(len(image), dtype=torch.bool, device=hidden.device)
    candidate[top_image] = False
    kept = list(image_pivots)
    for p in official_pivot_order(pivots):
        left = candidate.nonzero()[:, 0]
        sim = F.cosine_similarity(hidden[p], hidden[image[left]], dim=-1)
        take = left[(-sim).topk(min(per_pivot, len(left))).indices]  # the least similar
        candidate[take] = False
        kept += image[take].tolist()
    return kept


@register
class DART(LLMReducer):
    """Keep the image pivots and the image tokens least similar to each pivot (after layer K-1)."""

    catalog_id = "dart"
    kind = "pruning"
    needs = frozenset({"keys"})
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"tokens": 10**6},
        "some": {"tokens": 4, "pivot_image": 2, "pivot_text": 2},
    }

    def __init__(
        self,
        tokens: int | None = 128,
        ratio: float = 0.778,
        pivot_image: int = 4,
        pivot_text: int = 4,
        norm: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__()
        if tokens is not None and tokens < 0:
            raise ValueError(f"tokens must be >= 0 or None, got {tokens}")
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if pivot_image < 0:
            raise ValueError(f"pivot_image must be >= 0, got {pivot_image}")
        if pivot_text < 0 or pivot_image + pivot_text == 0:
            raise ValueError("pivot_text must be >= 0, with pivot_image + pivot_text > 0")
        self.tokens, self.ratio = tokens, ratio
        self.pivot_image, self.pivot_text = pivot_image, pivot_text
        # Kept out of the module tree: the norm belongs to the host, not to this method.
        self.__dict__["norm"] = norm

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        # The official scripts' row "keep" passes max_num_trunction = keep (K = 2), which
        # keeps keep // 8 * 8 tokens plus the 4 image pivots.
        return {"llm": {1: cls(tokens=keep)}}

    @classmethod
    def paper_placement(cls, num_layers: int, **kwargs) -> dict[int, DART]:
        # K = 2: prune on entering decoder layer 2, from layer 1's output (0-based).
        return {1: cls(**kwargs)} if num_layers > 2 else {}

    def per_pivot(self, n_image: int) -> int:
        total = self.tokens if self.tokens is not None else n_image * (1 - self.ratio)
        return int(total // (self.pivot_image + self.pivot_text))

    def kept(self, n_image: int, n_text: int) -> int:
        """Image tokens kept from ``n_image`` with ``n_text`` text tokens after them."""
        image = min(self.pivot_image, n_image)
        pivots = image + min(self.pivot_text, n_text)
        return image + min(pivots * self.per_pivot(n_image), n_image - image)

    def image_budget(self, n_image: int) -> tuple[int, int]:
        # Fewer text tokens than pivots (only then) keep fewer.
        return self.kept(n_image, 0), self.kept(n_image, self.pivot_text)

    def forward(self, h: Tensor, signals: LLMSignals) -> Reduction:
        start, length = signals.image_start, signals.image_len
        b, n, _ = h.shape
        if self.kept(length, self.pivot_text) >= length:
            every = torch.arange(length, device=h.device).expand(b, -1)
            return keep_image_tokens(h, None, start, length, every)
        with torch.no_grad():
            keys = getattr(signals, "keys", None)
            # [B, N]: L1 norm of the keys over heads, or the stand-in (module docstring)
            key_norm = h.abs().sum(-1) if keys is None else keys.abs().sum(dim=(1, 3))
            norm = self.norm if self.norm is not None else getattr(signals, "final_norm", None)
            hidden = h if norm is None else norm(h)
            positions = torch.arange(n, device=h.device)
            per_pivot, keep = self.per_pivot(length), []
            for i in range(b):
                valid = signals.valid[i]
                image = positions[start : start + length][valid[start : start + length]]
                text = positions[start + length :][valid[start + length :]]
                keep.append(
                    dart_keep(
                        hidden[i],
                        key_norm[i],
                        image,
                        text,
                        self.pivot_image,
                        self.pivot_text,
                        per_pivot,
                    )
                )
            if b == 0:
                keep = [[]]
            if len({len(k) for k in keep}) > 1:
                raise ValueError("DART: samples of the batch would keep different counts")
            index = torch.tensor(keep, dtype=torch.long, device=h.device).view(b, -1)  # [B, K]
        return keep_image_tokens(h, None, start, length, index - start)
