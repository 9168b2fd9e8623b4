"""LLaVA-PruMerge (and PruMerge+): adaptive pruning of visual tokens plus key-based merging.

Paper: "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
Models", https://arxiv.org/abs/2403.15388
Official code: https://github.com/42Shawn/LLaVA-PruMerge
(``llava/model/multimodal_encoder/clip_encoder.py``: ``token_prune_merge_advanced``,
``token_prune_merge_advanced_plus``, ``outlier_dectection``, ``complement_idx``)

Algorithm (Sec. 3, Algorithm 1), at the output of LLaVA's CLIP feature layer:
1. Score patch token j by the CLS attention ``a_j``; keep the tokens whose score is
   an outlier by the interquartile-range rule, ``a_j > Q3 + 1.5 (Q3 - Q1)`` (an
   adaptive count; or a fixed ``keep_ratio``). PruMerge+ adds tokens on a uniform
   grid (stride ``(N / kept) // 3``) so that every region of the image stays covered.
2. Each kept token i finds its ``k_nn`` nearest other tokens (all of them, kept or
   not) by cosine similarity of the keys and becomes ``x_i + sum_j a_j x_j``.
3. One extra token ``sum_j a_j x_j`` over the pruned tokens is appended.

Deviations from the official code:
- Signals: the official code (at commit 097c041) hooks the ``q_proj``/``k_proj``
  outputs of CLIP's last layer (layer 23, the one *after* the selected penultimate
  features), computes one single-head attention over all channels,
  ``softmax(q k^T / sqrt(C))``, and uses its CLS row as ``a_j`` and those
  full-width keys for the similarity. ``official_signals`` does exactly that, and
  the default ``signals="next"`` uses it when the host provides that layer's
  projections (``signals.next_q``, ``signals.next_k``, ``[B, N, C]``). The LLaVA
  host computes them at its vision hook when a block follows the selected layer
  (as in LLaVA-1.5, layer 22 of 24); where they are missing (the ViT host, a
  hook at the last block, a caller's own ``Signals``) the reducer falls back to
  the hook layer's own head-averaged CLS attention and keys (``signals="hook"``),
  which is not the official choice (the kept sets can differ widely).
- Batches: official PruMerge+ crashes at batch > 1 (it concatenates one grid row
  to the ``[B, k]`` indices), and both variants run the IQR test on the attention
  of the whole batch flattened (so one image changes another's count) and loop in
  Python over samples and kept tokens. Here each image gets its own count; the batch is padded
  to the largest count with that image's best *pruned* tokens, merged the same way,
  after its extra token (``Reduction.mask`` 0). A filler token still counts as
  pruned inside the extra token (so every image gets what it gets alone): its
  ``index`` is -1, its ``size`` 0, and its input token's ``assign`` is the extra
  token, whose ``size`` is the sum over all the pruned tokens. The hosts leave
  fillers out of attention, and a later PruMerge step scores each image on its own
  present tokens (``Signals.present``).
- Kept tokens are returned in spatial order, then the extra token; the official
  code orders them by attention (then the grid tokens, for PruMerge+).
- The kept count is the outlier count itself (the official ``int(N * count / N)``
  can lose one to float rounding) and at least one token is always kept (the
  official code keeps none, or divides by zero in PruMerge+, when nothing is an
  outlier). ``k_nn`` (official: 32) is clamped to the number of other tokens.
- PruMerge+ grid: positions ``0, s, 2s, ... < N - 1`` with ``s = max(1, (N // kept) // 3)``
  in the adaptive setting, ``s/2 + s*i`` with ``s = N // kept`` at a fixed ratio
  (the official training branch); the official code hard-codes ``N - 1 = 575`` and
  may duplicate tokens in the fixed-ratio branch, here grid and top tokens form a set.
- ``keep_ratio=1`` returns the input unchanged (no merge step); the official code
  has no such switch. The LoRA fine-tuning of the LLM on the reduced tokens (the
  paper's fine-tuned setting) is not part of this module.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity
from reference.ops import descending_rank, each_present_sample, iqr_outliers, sample_signals
from reference.registry import register


def select_tokens(score: Tensor, keep_ratio: float | None, plus: bool) -> Tensor:
    """PruMerge's keep set ``[B, M]`` (bool) from the CLS attention ``score [B, M]``."""
    b, m = score.shape
    rank = descending_rank(score)
    if keep_ratio is None:
        count = iqr_outliers(score).sum(1)  # [B] the adaptive count
    else:
        count = torch.full((b,), int(m * keep_ratio), device=score.device)
    count = count.clamp(min=1)
    keep = rank < count[:, None]  # top-count by attention (= the outliers)
    if plus:  # PruMerge+: spatially uniform supplement
        pos = torch.arange(m, device=score.device).expand(b, m)
        step = m // count[:, None]  # int(1 / reduction_ratio)
        if keep_ratio is None:
            stride = (step // 3).clamp(min=1)
            grid = pos % stride == 0
        else:
            grid = (pos >= step // 2) & ((pos - step // 2) % step == 0)
        keep = keep | (grid & (pos < m - 1))
    return keep


def knn_merge_weights(keys: Tensor, score: Tensor, rows: Tensor, k_nn: int) -> Tensor:
    """``[B, R, M]`` weights ``a_j`` on the ``k_nn`` key-nearest other tokens of each row.

    Args:
        keys: ``[B, M, D]`` keys of the patch tokens.
        score: ``[B, M]`` CLS attention of the patch tokens (the merge weights).
        rows: ``[B, R]`` the tokens (indices into M) that absorb their neighbours.
    """
    m = keys.shape[1]
    k = F.normalize(keys.float(), dim=-1)
    k_rows = k.gather(1, rows[..., None].expand(-1, -1, k.shape[-1]))  # [B, R, D]
    sim = k_rows @ k.transpose(1, 2)  # [B, R, M] cosine similarity
    sim = sim.scatter(2, rows[..., None], -torch.inf)  # a token is not its own neighbour
    nn_idx = sim.topk(min(k_nn, m - 1), dim=2).indices  # [B, R, k]
    weights = torch.zeros_like(sim)
    return weights.scatter(2, nn_idx, score.float()[:, None, :].expand_as(sim).gather(2, nn_idx))


def official_signals(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """The official scores from full-width projections ``q, k [B, N, C]`` (CLS first).

    Returns the CLS row ``[B, 1, N]`` of the single-head ``softmax(q k^T / sqrt(C))``
    and the keys ``k``, the ``cls_attn`` and ``keys`` that ``prumerge`` takes.
    """
    logits = (q[:, :1].float() @ k.float().transpose(1, 2)) * q.shape[-1] ** -0.5  # [B, 1, N]
    return logits.softmax(-1), k


def prumerge(
    x: Tensor,
    size: Tensor,
    cls_attn: Tensor,
    keys: Tensor,
    prefix: int,
    keep_ratio: float | None = None,
    plus: bool = False,
    k_nn: int = 32,
) -> Reduction:
    """Prune and merge the non-prefix tokens of ``x [B, N, C]`` (Algorithm 1).

    Returns ``[prefix][kept, spatial order][extra token][fillers]``: each image's
    own tokens first; fillers (``mask`` 0) pad a batch of unequal counts.
    """
    b, n, c = x.shape
    m, device = n - prefix, x.device
    with torch.no_grad():
        score = cls_attn.float().mean(1)[:, prefix:]  # [B, M] head-averaged a_j
        keep = select_tokens(score, keep_ratio, plus)  # [B, M]
        count = keep.sum(1)  # [B]
        width = int(count.max())
        # Kept tokens by position, then fillers by descending attention.
        pos = torch.arange(m, device=device).expand(b, m)
        sel = torch.where(keep, pos, m + descending_rank(score)).argsort(1)[:, :width]  # [B, W]
        weights = knn_merge_weights(keys[:, prefix:], score, sel, k_nn)  # [B, W, M]
        extra_w = (score * ~keep)[:, None, :]  # [B, 1, M] over the pruned tokens
    patches = x[:, prefix:]
    rows = patches.gather(1, sel[..., None].expand(-1, -1, c))  # [B, W, C]
    merged = rows + weights.to(x.dtype) @ patches  # x_i + sum_j a_j x_j
    extra = extra_w.to(x.dtype) @ patches  # [B, 1, C]

    # Slot of each selected token: the extra token sits right after the image's own.
    ar = torch.arange(width, device=device).expand(b, width)
    slot = prefix + ar + (ar >= count[:, None]).long()  # [B, W]
    out_n = prefix + width + 1
    out = x.new_empty(b, out_n, c)
    out[:, :prefix] = x[:, :prefix]
    out = out.scatter(1, slot[..., None].expand(-1, -1, c), merged)
    extra_slot = (prefix + count)[:, None]  # [B, 1]
    out = out.scatter(1, extra_slot[..., None].expand(-1, -1, c), extra)

    # A filler continues no input token (the pruned token it copies went into the
    # extra token), has size 0 and index -1: the image's tokens are what it gets alone.
    real = ar < count[:, None]  # [B, W]
    pre = torch.arange(prefix, device=device).expand(b, prefix)
    index = torch.full((b, out_n), -1, dtype=torch.long, device=device)
    index[:, :prefix] = pre
    index = index.scatter(1, slot, torch.where(real, sel + prefix, -1))
    assign = torch.cat([pre, (prefix + count)[:, None].expand(b, m)], 1)  # pruned -> extra
    kept_slot = torch.where(real, slot, (prefix + count)[:, None])
    assign = assign.scatter(1, sel + prefix, kept_slot)
    new_size = size.new_zeros(b, out_n, 1)
    new_size[:, :prefix] = size[:, :prefix]
    kept_size = size[:, prefix:].gather(1, sel[..., None]) * real[..., None]
    new_size = new_size.scatter(1, slot[..., None], kept_size)
    pruned = (~keep).to(size.dtype)  # [B, M]
    extra_size = (pruned[..., None] * size[:, prefix:]).sum(1, keepdim=True)  # [B, 1, 1]
    new_size = new_size.scatter(1, extra_slot[..., None], extra_size)
    mask = None
    if bool((count < width).any()):
        mask = (torch.arange(out_n, device=device) <= prefix + count[:, None]).to(x.dtype)
    return Reduction(x=out, size=new_size, index=index, assign=assign, mask=mask)


@register
class LLaVAPruMerge(TokenReducer):
    """PruMerge (``plus=False``) or PruMerge+ (``plus=True``) on the vision tower's output.

    ``keep_ratio=None`` is the paper's adaptive (IQR) selection; a float keeps
    ``int(N * keep_ratio)`` tokens by attention instead (1.0: no reduction).
    ``signals="next"`` scores with the next layer's full-width projections when the
    host gives them (the official choice), ``"hook"`` with the hook layer's
    head-averaged CLS attention and keys (see the module docstring).
    """

    catalog_id = "llava_prumerge"
    kind = "pruning"
    needs = frozenset({"cls_attn", "keys", "next_q", "next_k"})
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"keep_ratio": 1.0},
        "some": {},
    }

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        # The fixed-ratio variant, so that every budget of the sweep is met exactly.
        return {"vision": cls(keep_ratio=keep / n_image)}

    def __init__(
        self,
        keep_ratio: float | None = None,
        plus: bool = False,
        k_nn: int = 32,
        signals: str = "next",
    ):
        super().__init__()
        if keep_ratio is not None and not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1] or None, got {keep_ratio}")
        if signals not in ("next", "hook"):
            raise ValueError(f"signals must be 'next' or 'hook', got {signals!r}")
        self.keep_ratio, self.plus, self.k_nn, self.signals = keep_ratio, plus, k_nn, signals
        if signals == "hook":  # the host need not compute the next block's projections
            self.needs = frozenset({"cls_attn", "keys"})

    def _fixed(self, m: int) -> int:
        return max(1, int(m * self.keep_ratio))

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        m = n - prefix
        if m <= 1:  # nothing to select (forward returns the identity)
            return n, n
        if self.keep_ratio is not None:
            k = self._fixed(m)
            if k >= m:
                return n, n
            if not self.plus:
                return prefix + k + 1, prefix + k + 1
            step = m // k
            return prefix + k + 1, prefix + min(m, k + len(range(step // 2, m - 1, step))) + 1
        if self.plus:
            return prefix + 2, prefix + m + 1
        # Only tokens ranked above the interpolated Q3 can exceed Q3 + 1.5 IQR.
        most = max(1, m - 1 - int(0.75 * (m - 1)))
        return prefix + 2, prefix + most + 1

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        m = x.shape[1] - signals.prefix
        if m <= 1 or (self.keep_ratio is not None and self._fixed(m) >= m):
            return identity(x, signals.size)
        if x.shape[0] == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(x.shape[1], signals.prefix)[0])
        present = signals.present
        if present is not None and not bool(present.all()):  # after an earlier padded step
            return each_present_sample(
                x,
                signals.size,
                present,
                lambda i, t: self(x[i : i + 1, t], sample_signals(signals, i, t)),
            )
        cls_attn, keys = signals.cls_attn, signals.keys
        q, k = getattr(signals, "next_q", None), getattr(signals, "next_k", None)
        if self.signals == "next" and q is not None and k is not None:
            cls_attn, keys = official_signals(q, k)
        return prumerge(
            x,
            signals.size,
            cls_attn,
            keys,
            signals.prefix,
            self.keep_ratio,
            self.plus,
            self.k_nn,
        )
