"""Recoverable Compression: text-guided visual token recovery.

Paper: "Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided
by Text Information", https://arxiv.org/abs/2409.01179
Official code: https://github.com/banjiuyufen/Recoverable-Compression
(``llava/model/multimodal_encoder/clip_encoder.py``:
``token_recycling_with_text_in_vision_and_clustring``, ``find_max_derivative_position``)

Algorithm (training-free, on the CLIP features that feed LLaVA's projector):
1. Visual filter: keep the top-k patches by CLS attention, k set per image by the
   share of Local-Outlier-Factor outliers among the CLS-attention values.
2. Text recovery: score the rest by cosine similarity to the question's text
   embedding and recover their top-k, k again set by a LOF outlier share.
3. Secondary recovery: among the remaining tokens, the LOF share of CLS-attention
   outliers become cluster centres; each centre adds its 32 nearest tokens (key
   cosine + 50 x text score), weighted by CLS attention; the non-centres are summed
   into one extra token, weighted by CLS attention.
4. Output: recovered tokens in spatial order, then the centres, then the extra token.

Deviations from the official code:
- Signals: the host's head-mean CLS attention and head-mean keys of the selected
  layer; the official code builds a one-head attention from layer 23's full q/k
  projections (the layer after the one it selects). Text features come from
  ``signals.state["text"]`` ``[B, T, C]`` in the vision feature space, mean-pooled
  over T (CLIP's pooled text embedding in the official code), and are compared with
  the features themselves rather than with CLIP's projected last layer. Without
  ``state["text"]`` (plain ViT host) the CLS token is the query.
- LOF (sklearn ``LocalOutlierFactor``, ``contamination="auto"``: LOF > 1.5) is
  re-implemented in torch, per image; the official code pools the batch into one
  LOF fit. The batch is padded to the largest count with each image's dropped
  tokens after its own (``Reduction.mask`` 0 marks them).
- Fixed official bugs: the centre count is the LOF share of the *remaining* tokens
  (the code multiplies by the channel count, ``N = index.shape[-1]``); keys of the
  remaining tokens are gathered at their own positions (the code indexes the full
  key tensor with positions into the remaining set); text-recovered tokens are
  drawn from the tokens the visual filter left (the code sets the others to the
  minimum score, which ties can still select); counts are the outlier counts
  (no float round trip); the neighbour count is clamped to what is available.
- Guard: at most ``remaining - 2`` centres, so the output is always shorter than
  the input (LOF never flags every token; this only bites in degenerate cases).
- As in the official code, the extra token is dropped when there is no centre.
  Centre and extra tokens get the summed ``size`` of what they absorbed (a token
  can feed several centres). ``vision_ratio`` (a fixed share for step 1; 1.0 keeps
  everything) is our knob; the paper's setting is ``None`` (LOF).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, gather_tokens, identity
from reference.registry import register


def lof_outliers(values: Tensor, valid: Tensor, k: int = 20) -> Tensor:
    """sklearn's ``LocalOutlierFactor(k).fit_predict`` on the 1-D ``values`` of each row.

    Args:
        values: ``[B, M]`` scalars.
        valid: ``[B, M]`` which entries belong to the row's point set.
        k: ``n_neighbors`` (clamped to the set size minus one, as sklearn does).

    Returns:
        ``[B, M]`` True for the outliers (LOF > 1.5, ``contamination="auto"``).
    """
    b, m = values.shape
    v = values.float()
    size = valid.sum(dim=1)  # [B]
    kk = (size - 1).clamp(min=1, max=k)  # [B]
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)  # [B, M, M]
    pair &= ~torch.eye(m, dtype=torch.bool, device=v.device)  # a point is not its own neighbour
    dist = (v.unsqueeze(2) - v.unsqueeze(1)).abs().masked_fill(~pair, torch.inf)
    width = min(k, max(m - 1, 1))
    knn, nbr = dist.topk(width, dim=2, largest=False)  # [B, M, k] ascending
    use = torch.arange(width, device=v.device) < kk[:, None, None]  # [B, 1, k]
    k_dist = knn.gather(2, (kk - 1)[:, None, None].expand(b, m, 1)).squeeze(2)  # [B, M]
    reach = torch.maximum(knn, k_dist.gather(1, nbr.flatten(1)).view_as(nbr))
    reach = torch.where(use, reach, 0.0)
    lrd = 1.0 / (reach.sum(2) / kk[:, None] + 1e-10)  # local reachability density
    ratio = torch.where(use, lrd.gather(1, nbr.flatten(1)).view_as(nbr) / lrd.unsqueeze(2), 0.0)
    lof = ratio.sum(2) / kk[:, None]  # [B, M]
    return valid & (size >= 2).unsqueeze(1) & (lof > 1.5)


def top_mask(score: Tensor, allowed: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, M]`` mask of the top-``count [B]`` allowed entries, and every entry's rank."""
    b, m = score.shape
    order = score.masked_fill(~allowed, -torch.inf).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(m, device=score.device).expand(b, m)
    )
    return allowed & (rank < count.unsqueeze(1)), rank


def recoverable_compression(
    x: Tensor,
    size: Tensor,
    cls_attn: Tensor,
    keys: Tensor,
    text: Tensor,
    prefix: int,
    vision_ratio: float | None = None,
    neighbors: int = 32,
    text_weight: float = 50.0,
) -> Reduction:
    """Visual filter, text recovery and text-guided clustering of ``x [B, N, C]``.

    Args:
        x: ``[B, N, C]`` vision features; ``size`` ``[B, N, 1]`` token sizes.
        cls_attn: ``[B, H, N]`` CLS attention; ``keys``: ``[B, N, D]``.
        text: ``[B, T, C]`` text features in the vision feature space.
        prefix: protected tokens at the front.
        vision_ratio: fixed share kept by the visual filter; None: LOF (paper).
        neighbors: tokens each cluster centre absorbs; ``text_weight``: weight of
            the text score in the neighbour ranking.

    Returns:
        A ``Reduction``: prefix, recovered tokens (spatial order), centres (by
        descending CLS attention), the extra token (``index == -1``), fillers.
    """
    b, n, c = x.shape
    m = n - prefix
    device = x.device
    pos = torch.arange(m, device=device).expand(b, m)
    with torch.no_grad():
        attn = cls_attn.float().mean(dim=1)[:, prefix:]  # [B, M]
        query = F.normalize(text.float().mean(dim=1), dim=-1)  # [B, C]
        patches = F.normalize(x[:, prefix:].float(), dim=-1)
        sim = (patches @ query.unsqueeze(-1)).squeeze(-1) * c**-0.5  # [B, M] text score
        everything = torch.ones_like(attn, dtype=torch.bool)
        # 1. Visual filter: LOF share of the CLS attention (n_neighbors=20).
        if vision_ratio is None:
            n_v = lof_outliers(attn, everything, 20).sum(1)
        else:
            n_v = torch.full((b,), int(m * vision_ratio), device=device)
        vis, rank_attn = top_mask(attn, everything, n_v)
        if bool(vis.all()):
            return identity(x, size)
        # 2. Text recovery among the rest; the visual picks score the minimum for LOF.
        sim_rest = torch.where(vis, sim.min(dim=1, keepdim=True).values, sim)
        n_t = (m - n_v) * lof_outliers(sim_rest, everything, 20).sum(1) // m
        txt, _ = top_mask(sim, ~vis, n_t)
        rest = ~(vis | txt)  # [B, M]
        n_rest = rest.sum(1)
        # 3. Secondary recovery: centres are the LOF share of the rest by CLS attention.
        n_c = lof_outliers(attn, rest, 10).sum(1).clamp(max=(n_rest - 2).clamp(min=0))
        centre, _ = top_mask(attn, rest, n_c)
        k_norm = F.normalize(keys[:, prefix:].float(), dim=-1)
        affinity = k_norm @ k_norm.transpose(1, 2) + text_weight * sim.unsqueeze(1)  # [B, M, M]
        pair = rest.unsqueeze(1) & ~torch.eye(m, dtype=torch.bool, device=device)
        width = max(min(neighbors, m - 1), 1)
        top = affinity.masked_fill(~pair, -torch.inf).topk(width, dim=2)
        member = torch.zeros_like(pair).scatter(2, top.indices, torch.isfinite(top.values))
        weight = (member * attn.unsqueeze(1)).to(x.dtype)  # [B, M, M] CLS attention of members
        has_extra = n_c > 0
        # Bank of 2M + 1 entries: raw patches, updated centres, extra token. Sort keys:
        # recovered by position < centres by attention < extra < fillers < unused.
        big = 6 * m
        key_raw = torch.where(vis | txt, pos, torch.where(rest & ~centre, 3 * m + rank_attn, big))
        key_ctr = torch.where(centre, m + rank_attn, big)
        key_ext = torch.where(has_extra, 2 * m, 5 * m).unsqueeze(1)
        keys_all = torch.cat([key_raw, key_ctr, key_ext], 1)  # [B, 2M + 1]
        real_count = (vis | txt).sum(1) + n_c + has_extra.long()
        out_width = int(real_count.max())
        sel = keys_all.argsort(dim=1, stable=True)[:, :out_width]  # [B, W]

    patch_x, patch_size = x[:, prefix:], size[:, prefix:]
    centres = patch_x + weight @ patch_x  # [B, M, C] x_i + sum_j a_j x_j over its neighbours
    ctr_size = patch_size + member.to(size.dtype) @ patch_size
    others = (rest & ~centre).unsqueeze(-1)  # [B, M, 1]
    extra = ((attn.unsqueeze(-1) * others).to(x.dtype) * patch_x).sum(1, keepdim=True)
    ext_size = (patch_size * others).sum(1, keepdim=True)
    bank = torch.cat([patch_x, centres, extra], 1)  # [B, 2M + 1, C]
    bank_size = torch.cat([patch_size, ctr_size, ext_size], 1)

    source = torch.cat([pos, pos, pos.new_full((b, 1), -1)], 1).gather(1, sel)  # [B, W]
    pre = torch.arange(prefix, device=device).expand(b, prefix)
    index = torch.cat([pre, torch.where(source < 0, -1, source + prefix)], 1)
    slots = torch.arange(index.shape[1], device=device).expand(b, -1)
    assign = torch.full((b, n + 1), -1, dtype=torch.long, device=device)
    assign.scatter_(1, torch.where(index < 0, n, index), slots)  # column n absorbs the -1s
    ext_slot = (prefix + real_count - 1).unsqueeze(1).expand(b, m)
    into_extra = rest & ~centre & has_extra.unsqueeze(1)
    assign = torch.cat(
        [assign[:, :prefix], torch.where(into_extra, ext_slot, assign[:, prefix:n])], 1
    )

    mask = None
    if bool((real_count < out_width).any()):
        real = torch.arange(out_width, device=device) < real_count.unsqueeze(1)
        mask = torch.cat([torch.ones_like(pre, dtype=torch.bool), real], 1).to(x.dtype)
    return Reduction(
        x=torch.cat([x[:, :prefix], gather_tokens(bank, sel)], 1),
        size=torch.cat([size[:, :prefix], gather_tokens(bank_size, sel)], 1),
        index=index,
        assign=assign,
        mask=mask,
    )


@register
class RecoverableCompression(TokenReducer):
    """CLS-attention filter + text-guided recovery + clustering of the rest (LOF counts)."""

    catalog_id = "recoverable_compression"
    kind = "token-recovery"
    needs = frozenset({"cls_attn", "keys"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"vision_ratio": 1.0},
        "some": {},
    }

    def __init__(
        self, vision_ratio: float | None = None, neighbors: int = 32, text_weight: float = 50.0
    ):
        super().__init__()
        if vision_ratio is not None and not 0 <= vision_ratio <= 1:
            raise ValueError(f"vision_ratio must be in [0, 1] or None, got {vision_ratio}")
        self.vision_ratio = vision_ratio
        self.neighbors = neighbors
        self.text_weight = text_weight

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        m = n - prefix
        if self.vision_ratio is not None and int(m * self.vision_ratio) >= m:
            return n, n
        # At least one token is left after steps 1-2, and the centre guard merges
        # at least two of the rest away; with no centre the rest is dropped.
        return prefix, max(prefix, n - 1)

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        text = signals.state.get("text")
        if text is None:
            text = x[:, :1]  # no question given: the CLS token is the query
        if x.shape[1] == signals.prefix:  # no patch to select
            return identity(x, signals.size)
        if x.shape[0] == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(x.shape[1], signals.prefix)[0])
        return recoverable_compression(
            x,
            signals.size,
            signals.cls_attn,
            signals.keys,
            text,
            signals.prefix,
            self.vision_ratio,
            self.neighbors,
            self.text_weight,
        )
