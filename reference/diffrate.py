"""DiffRate: differentiable compression rates for pruning and merging.

Paper: "DiffRate : Differentiable Compression Rate for Efficient Vision Transformers",
https://arxiv.org/abs/2305.17997
Official code: https://github.com/OpenGVLab/DiffRate (``DiffRate/ddp.py``,
``DiffRate/patch/deit.py``, ``DiffRate/merge.py``)

Algorithm (Sec. 3):
1. After a block's attention, rank the image tokens by the CLS attention (mean over
   heads). Prune: keep the ``prune_kept`` most important. Merge: of those, the tokens
   ranked below ``merge_kept`` go into their most cosine-similar token among the top
   ``merge_kept`` (plain mean of the destination and its sources).
2. Each count is a learned distribution over candidates ``{P, P-g, ..., >=1}``
   (differentiable discrete proxy, DDP); its expectation, rounded up with a
   straight-through ceil, is the count. During the search a token of rank ``i`` is
   masked with a straight-through mask whose gradient is ``P(count > i)``.
3. The search trains only these distributions, with the task loss plus
   ``(FLOPs - target)^2``, on a frozen ViT; the found counts are then applied as is.

Deviations from the official code:
- Hook: ``"mid"``, as the official block. Tokens are not physically re-sorted by
  importance every block: ranks are computed, and outputs keep the spatial order.
- Counts are of image tokens (the official ones include the CLS token: ours + 1); all
  ``prefix`` tokens are protected (official: CLS only). Passing ``prune_kept`` /
  ``merge_kept`` pins a count, like the official ``set_kept_num``; ``None`` takes it
  from the learned distribution. The official model leaves block 0 uncompressed;
  here the caller picks the blocks.
- Search (training) path: the token count stays fixed and the mask is returned in
  ``Reduction.mask`` and carried to later blocks in ``signals.state``. The official
  attention also applies the mask (``softmax_with_policy``), which lets masked tokens
  sink to the bottom of the CLS-attention ranking; the ViT host applies it the same
  way, and masked tokens are also ranked last explicitly (for a caller's own
  signals). The straight-through counts of every block go to
  ``signals.state["diffrate_kept"]`` for :func:`search_flops`; the loss, the
  optimiser and the FLOPs target are left to the caller.
- Merging scores all ``M x M`` image-token pairs and masks the non-destinations
  (one function serves both paths); the official code scores sources x destinations.
- Sizes: a destination's ``size`` is the sum of what it absorbed, as the contract of
  this package asks; ``similarity_size=True`` gives the official one (sources count
  ``size * cosine``, here with negative cosines counted as 0 so that ``log(size)``
  stays defined; the official search path also clamps that to >= 1, left out).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, gather_tokens, identity
from reference.registry import register

# Schedules searched by the authors (``compression_rate.json`` at commit 91ae3e3; counts
# include the CLS token), keyed by (depth, width) of the host: DeiT-T at 0.8 GFLOPs,
# DeiT-S at 2.9, DeiT-B at 11.5 (the README's examples for S and B; the README has none
# for T: 0.8 of its 1.3 is the released target nearest S's and B's ~0.64x of the full
# FLOPs), MAE ViT-L at 42.3 (the README's example). Other hosts get no setting.
SCHEDULES: dict[tuple[int, int], tuple[list[int], list[int]]] = {
    (12, 192): (
        [197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3],
        [197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3],
    ),
    (12, 384): (
        [197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3],
        [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3],
    ),
    (12, 768): (
        [197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3],
        [197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3],
    ),
    (24, 1024): (
        [197, 197, 197, 195, 194, 193, 191, 187, 182, 180, 173, 149,
         142, 134, 125, 121, 111, 106, 91, 87, 77, 39, 38, 32],
        [197, 197, 196, 194, 193, 192, 187, 183, 181, 173, 154, 146,
         137, 127, 123, 114, 105, 98, 87, 75, 43, 45, 32, 32],
    ),
}  # fmt: skip


def ste_ceil(x: Tensor) -> Tensor:
    """``ceil(x)`` forward, identity gradient (the official ``STE_Ceil``)."""
    return x + (x.ceil() - x).detach()


def expected_kept(logits: Tensor, candidates: Tensor) -> Tensor:
    """Straight-through kept count of a DDP: ``ceil(sum_c c * softmax(logits)_c)``."""
    return ste_ceil((candidates.float() * logits.float().softmax(dim=-1)).sum())


def keep_probability(logits: Tensor, candidates: Tensor, m: int) -> Tensor:
    """``[m]`` probability that the token of rank ``i`` is kept: ``P(count > i)``."""
    ranks = torch.arange(m, device=logits.device)
    kept_if = candidates[None, :] > ranks[:, None]  # [m, K]
    return (logits.float().softmax(dim=-1) * kept_if).sum(dim=-1)


def importance_rank(cls_attn: Tensor, prefix: int, live: Tensor | None = None) -> Tensor:
    """``[B, N - prefix]`` rank of each image token by mean CLS attention (0 = most)."""
    with torch.no_grad():
        score = cls_attn[:, :, prefix:].float().mean(dim=1)  # [B, M]
        if live is not None:  # tokens masked by earlier blocks rank last
            score = score.masked_fill(~live, -torch.inf)
        order = score.sort(dim=1, descending=True, stable=True).indices
        return order.argsort(dim=1)


def merge_into(x: Tensor, size: Tensor, src: Tensor, dst: Tensor, similarity_size: bool):
    """Merge tokens flagged ``src [B, M]`` into their most similar ``dst [B, M]`` token.

    Returns ``x' [B, M, C]`` (a destination becomes the plain mean of itself and its
    sources, ``scatter_reduce(mean)`` in the official code), ``size' [B, M, 1]`` and
    ``match [B, M]`` (each token's destination).
    """
    with torch.no_grad():
        unit = F.normalize(x.float(), dim=-1)
        sim = (unit @ unit.transpose(1, 2)).masked_fill(~dst[:, None, :], -torch.inf)
        node_max, match = sim.max(dim=-1)  # [B, M]
    w = src.to(x.dtype)[..., None]  # [B, M, 1]
    to = match[..., None]
    total = x + torch.zeros_like(x).scatter_add(1, to.expand_as(x), w * x)
    count = 1 + torch.zeros_like(w).scatter_add(1, to, w)
    src_size = size * node_max.clamp(min=0).to(size.dtype)[..., None] if similarity_size else size
    new_size = size + torch.zeros_like(size).scatter_add(1, to, src_size * w.to(size.dtype))
    return total / count, new_size, match


def diffrate_compress(
    x: Tensor, size: Tensor, cls_attn: Tensor, prefix: int, prune_kept: int, merge_kept: int,
    similarity_size: bool = False,
) -> Reduction:  # fmt: skip
    """Inference step on ``x [B, N, C]``: keep ``min(prune_kept, merge_kept)`` image tokens."""
    b, n, _ = x.shape
    m = n - prefix
    mid, kept = min(m, prune_kept), min(m, prune_kept, merge_kept)
    if kept >= m:
        return identity(x, size)
    rank = importance_rank(cls_attn, prefix)  # [B, M]
    dst, src = rank < kept, (rank >= kept) & (rank < mid)
    body, body_size, match = merge_into(x[:, prefix:], size[:, prefix:], src, dst, similarity_size)
    with torch.no_grad():
        keep = dst.nonzero()[:, 1].view(b, kept)  # image indices of the destinations, sorted
        slot = torch.full((b, m), -1, dtype=torch.long, device=x.device)
        slot.scatter_(1, keep, prefix + torch.arange(kept, device=x.device).expand(b, -1))
        assign_body = torch.where(src, slot.gather(1, match), slot)  # sources follow their dst
    pre = torch.arange(prefix, device=x.device).expand(b, prefix)
    return Reduction(
        x=torch.cat([x[:, :prefix], gather_tokens(body, keep)], dim=1),
        size=torch.cat([size[:, :prefix], gather_tokens(body_size, keep)], dim=1),
        index=torch.cat([pre, keep + prefix], dim=1),
        assign=torch.cat([pre, assign_body], dim=1),
    )


def search_flops(kept: list[tuple[Tensor, Tensor]], n: int, dim: int, prefix: int = 1) -> Tensor:
    """Differentiable FLOPs of the blocks (the official ``calculate_flop_training``).

    Args:
        kept: one ``(prune, merge)`` straight-through count pair per block, in order
            (``signals.state["diffrate_kept"]`` when every block has a DiffRate).
        n: tokens entering the first block; dim: embedding width.
    """
    device = kept[0][0].device if kept else None
    tokens = torch.tensor(float(n), device=device)
    flops = torch.zeros((), device=device)
    for prune, merge in kept:
        flops = flops + 4 * tokens * dim**2 + 2 * tokens**2 * dim  # attention
        p, q = prune + prefix, merge + prefix
        smallest = torch.minimum(tokens, torch.minimum(p, q)).detach()
        tokens = smallest + (p + q) - (p + q).detach()  # official ``ste_min``: grad to both
        flops = flops + 8 * tokens * dim**2  # MLP
    return flops


@register
class DiffRate(TokenReducer):
    """Prune then merge with learned (or pinned) per-block kept counts."""

    catalog_id = "diffrate"
    kind = "rate-search"
    needs = frozenset({"cls_attn"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"patch_number": 16, "prune_kept": 16, "merge_kept": 16},
        "some": {"patch_number": 16, "prune_kept": 12, "merge_kept": 8},
    }

    def __init__(
        self, patch_number: int = 196, prune_kept: int | None = None,
        merge_kept: int | None = None, granularity: int = 1, similarity_size: bool = False,
    ):  # fmt: skip
        super().__init__()
        if patch_number < 1:
            raise ValueError(f"patch_number must be >= 1, got {patch_number}")
        if granularity < 1:
            raise ValueError(f"granularity must be >= 1, got {granularity}")
        for name, count in (("prune_kept", prune_kept), ("merge_kept", merge_kept)):
            if count is not None and not 1 <= count <= patch_number:
                raise ValueError(
                    f"{name} must be in [1, patch_number={patch_number}] or None, got {count}"
                )
        # Integer buffer, so that ``.to(bfloat16)`` cannot round the counts.
        cands = torch.arange(patch_number, 0, -granularity)  # [K]
        self.register_buffer("candidates", cands, persistent=False)
        # DDP logits; zeros = uniform over the candidates, as the official initialisation.
        self.prune_logits = nn.Parameter(torch.zeros(len(cands)))
        self.merge_logits = nn.Parameter(torch.zeros(len(cands)))
        self.prune_kept, self.merge_kept = prune_kept, merge_kept
        self.similarity_size = similarity_size

    @classmethod
    def paper_setting(cls, depth: int, dim: int) -> tuple[dict[int, dict], bool]:
        """The authors' searched schedule for the host (:data:`SCHEDULES`), by depth and width."""
        if (depth, dim) not in SCHEDULES:
            return {}, False
        prune, merge = SCHEDULES[depth, dim]
        setting = {
            layer: {"prune_kept": p - 1, "merge_kept": q - 1, "similarity_size": True}
            for layer, (p, q) in enumerate(zip(prune, merge, strict=True))
        }
        return setting, True

    def kept_counts(self) -> tuple[int, int]:
        """Image tokens kept after pruning and after merging (pinned or learned)."""
        cands = self.candidates.float()
        prune = self.prune_kept
        merge = self.merge_kept
        if prune is None:
            prune = int(expected_kept(self.prune_logits, cands))
        if merge is None:
            merge = int(expected_kept(self.merge_logits, cands))
        return prune, merge

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        if self.training:
            return n, n
        out = prefix + min(n - prefix, *self.kept_counts())
        return out, out

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        if not self.training:
            prune, merge = self.kept_counts()
            return diffrate_compress(
                x, signals.size, signals.cls_attn, signals.prefix, prune, merge,
                self.similarity_size,
            )  # fmt: skip
        return self._search_step(x, signals)

    def _search_step(self, x: Tensor, signals: Signals) -> Reduction:
        """Fixed token count; straight-through masks carry the gradient to the logits."""
        b, n, _ = x.shape
        prefix, m = signals.prefix, n - signals.prefix
        cands = self.candidates.float()
        prev = signals.state.get("diffrate_mask")  # [B, M] mask of earlier blocks
        if prev is None or prev.shape != (b, m):
            prev = x.new_ones(b, m)
        live = prev.detach() > 0
        rank = importance_rank(signals.cls_attn, prefix, live)  # [B, M]
        last = live.sum(dim=1, keepdim=True)  # [B, 1] tokens still alive
        prune_n = expected_kept(self.prune_logits, cands)
        merge_n = expected_kept(self.merge_logits, cands)
        signals.state.setdefault("diffrate_kept", []).append((prune_n, merge_n))
        prune, merge = self.kept_counts()

        def ste_mask(logits: Tensor, hard: Tensor) -> Tensor:
            prob = keep_probability(logits, cands, m).gather(0, rank.flatten()).view(b, m)
            return (hard.float() - prob.detach() + prob).to(x.dtype)  # [B, M]

        # Pruning drops ranks [prune, last); merging folds ranks [merge, mid) away.
        mid = last.clamp(max=prune)
        mask = prev
        pruning = rank >= prune
        mask = mask * torch.where(last > prune, ste_mask(self.prune_logits, ~pruning), 1)
        src = (rank >= merge) & (rank < mid)
        mask = mask * torch.where(mid > merge, ste_mask(self.merge_logits, ~src), 1)
        body, body_size, _ = merge_into(
            x[:, prefix:], signals.size[:, prefix:], src, rank < merge, self.similarity_size
        )
        signals.state["diffrate_mask"] = mask
        ar = torch.arange(n, device=x.device).expand(b, n)
        return Reduction(
            x=torch.cat([x[:, :prefix], body], dim=1),
            size=torch.cat([signals.size[:, :prefix], body_size], dim=1),
            index=ar,
            assign=ar,
            mask=torch.cat([mask.new_ones(b, prefix), mask], dim=1),
        )
