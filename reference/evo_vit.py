"""Evo-ViT: slow-fast token evolution.

Paper: "Evo-ViT: Slow-Fast Token Evolution for Dynamic Vision Transformer",
https://arxiv.org/abs/2108.01390
Official code: https://github.com/YifanXu74/Evo-ViT (``deit/evo_deit.py``,
``levit/evo_levit.py``: ``StageModule``, ``merge_tokens``, ``Attention``)

Algorithm:
1. Global class attention evolves across layers: ``g <- (1 - a) g + a A_cls``
   (CLS attention averaged over heads; only the tokens that went through this
   layer's attention are updated, the others keep their old ``g``).
2. Structure-preserving selection: the top-k tokens by ``g`` are informative;
   the rest are placeholders, kept aside (not discarded) with their positions.
3. Slow-fast updating: informative tokens plus one representative token (the
   ``g``-weighted mean of the placeholders) run through the full block (slow);
   every placeholder then receives the representative token's residual update
   (fast), so all tokens live on and can be re-selected in a later layer.

Deviations from the official code:
- Hook: ``"mid"`` (after attention, before the MLP) on every block from the
  first reducing one; the official code selects before the attention. The host
  exposes attention signals only at ``"mid"``, so each hook first folds this
  layer's CLS attention into ``g`` and then selects; the tokens chosen with
  ``g`` after layer l still meet layer l+1's attention, as in the official code,
  but layer l's MLP already runs on the new selection.
- Fast update across hooks: the placeholders, their ``g`` and sizes and the
  representative token as it was created are kept in ``Signals.state``; the next
  hook adds the representative token's change since then (MLP of this block and
  attention of the next, the official ``raw_x1 + raw_x2``) to every placeholder.
  A hook whose input does not have the shape the previous one produced starts
  afresh. A hook with ``keep_rate=1`` after reducing hooks restores every token
  in spatial order (the official end-of-stage restore); the host's final
  ``norm``/head read only the CLS token, so placeholders left in ``state`` after
  the last block are not restored into the output.
- Each hook re-selects, from every carried token, with ``g`` as it stands (the
  official non-stage-wise path), and ``g`` evolves only at hooks. The official DeiT
  default (``stage_wise_prune``) is not reproducible with hooks: it selects before
  blocks 4 and 8 with ``g`` from blocks 0-3 (trade-off 1, so ``g`` is block 3's CLS
  attention), keeps evolving ``g`` on the informative tokens at every block 4-11
  and restores all tokens after blocks 7 and 11; hooking only blocks 4 and 8 folds
  in neither blocks 5-7's attention nor block 3's, and a ``"mid"`` hook at block 3
  would run block 3's MLP on the selection. The DeiT release has no representative
  token (``representative=False`` reproduces it: placeholders are carried
  unchanged); the default ``True`` is the LeViT release's.
- ``g`` reads the host's ``cls_attn`` under ``torch.no_grad()``; the official
  LeViT code lets gradient reach the attention through the representative
  token's weights. Its learnable trade-off (``learn_tradeoff``) and the
  ``g`` rescaling after LeViT's subsampling stages are left out: ``alpha`` is
  the fixed DeiT value 0.5 (the first reducing hook sets ``g`` from its own
  layer, as the official trade-off of 1 for the first four layers does).
- Head: the official DeiT release classifies, at inference, from the normed mean
  of all patch tokens (placeholders restored), and trains a CLS head only as an
  auxiliary loss; the host's head reads the CLS token, so its logits are not the
  official model's. Both heads and the auxiliary loss are left to the host.
- ``g`` uses the CLS attention averaged over heads (official: summed; every term of
  the update scales alike, so the ranking is the same). ``k = int(keep_rate * M)``
  (official), at least 1.
- All ``prefix`` tokens are protected; informative tokens are returned in
  spatial order (the official code sorts by ``g``); the representative token is
  last, has ``index == -1`` and ``size`` the sum of the placeholders' sizes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, gather_tokens, identity
from reference.registry import register

STATE_KEY = "evo_vit"


def evolve_global_attention(g: Tensor, cls_attn: Tensor, rows: Tensor, alpha: float) -> Tensor:
    """``g [B, M]`` with ``(1 - alpha) g + alpha cls_attn [B, k]`` at ``rows [B, k]``."""
    old = g.gather(1, rows)
    return g.scatter(1, rows, (1 - alpha) * old + alpha * cls_attn)


def select_and_summarise(
    tokens: Tensor, size: Tensor, g: Tensor, k: int, representative: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Top-``k`` informative tokens by ``g [B, M]`` and the placeholders' representative.

    Returns ``top [B, k]`` (sorted indices into ``tokens [B, M, C]``), the
    representative token ``[B, 1, C]`` (``g``-weighted mean of the placeholders,
    official ``merge_tokens``) and its size ``[B, 1, 1]``; None when not wanted.
    """
    top = g.topk(k, dim=1).indices.sort(dim=1).values  # [B, k]
    if not representative or k == g.shape[1]:
        return top, None, None
    placeholder = torch.ones_like(g).scatter(1, top, 0.0)  # [B, M]
    weight = g * placeholder
    weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    rep = (weight.to(tokens.dtype).unsqueeze(-1) * tokens).sum(dim=1, keepdim=True)  # [B, 1, C]
    rep_size = (placeholder.to(size.dtype).unsqueeze(-1) * size).sum(dim=1, keepdim=True)
    return top, rep, rep_size


@register
class EvoViT(TokenReducer):
    """Keep ``keep_rate`` of the tokens informative; carry the rest as placeholders."""

    catalog_id = "evo_vit"
    kind = "adaptive-computation"
    needs = frozenset({"cls_attn"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"keep_rate": 1.0},
        "some": {"keep_rate": 0.5},
    }

    def __init__(self, keep_rate: float = 1.0, alpha: float = 0.5, representative: bool = True):
        super().__init__()
        if not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.keep_rate = keep_rate
        self.alpha = alpha
        self.representative = representative

    def num_informative(self, m: int) -> int:
        return m if self.keep_rate >= 1 else max(1, int(self.keep_rate * m))

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        """For a first (fresh) hook; chained hooks keep ``k`` of all carried tokens."""
        k = self.num_informative(n - prefix)
        out = n if k >= n - prefix else prefix + k + int(self.representative)
        return out, out

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, c = x.shape
        p = signals.prefix
        with torch.no_grad():
            attn = signals.cls_attn.float().mean(dim=1)  # [B, N]
        prev = signals.state.get(STATE_KEY)
        if prev is not None and (prev["n_out"] != n or prev["tokens"].shape[0] != b):
            prev = None  # not the tokens the previous hook produced
        if prev is None:
            if self.num_informative(n - p) >= n - p:
                return identity(x, signals.size)
            tokens, size, g = x[:, p:], signals.size[:, p:], attn[:, p:]  # [B, M, C] ...
            rows = torch.arange(n - p, device=x.device).expand(b, -1)  # input slot j -> token j
        else:
            rows = prev["top"]  # [B, k'] carried token behind input slot p + j
            k_in = rows.shape[1]
            tokens = prev["tokens"]
            if prev["rep"] is not None:  # fast update: placeholders take the rep's residual
                tokens = tokens + (x[:, -1:] - prev["rep"])
            # Slow path: informative tokens come back from the block itself.
            tokens = tokens.scatter(1, rows.unsqueeze(-1).expand(-1, -1, c), x[:, p : p + k_in])
            size = prev["size"].scatter(1, rows.unsqueeze(-1), signals.size[:, p : p + k_in])
            g = evolve_global_attention(prev["g"], attn[:, p : p + k_in], rows, self.alpha)

        m = tokens.shape[1]
        k = self.num_informative(m)
        top, rep, rep_size = select_and_summarise(tokens, size, g.detach(), k, self.representative)
        slot_rep = p + k if rep is not None else -1

        # Bookkeeping: which input slot each output continues, where each input went.
        pre = torch.arange(p, device=x.device).expand(b, p)
        slot_in = torch.full((b, m), -1, dtype=torch.long, device=x.device)
        slot_in.scatter_(1, rows, p + torch.arange(rows.shape[1], device=x.device).expand(b, -1))
        index = torch.cat([pre, slot_in.gather(1, top)], dim=1)  # -1: a re-selected placeholder
        slot_out = torch.full((b, m), slot_rep, dtype=torch.long, device=x.device)
        slot_out.scatter_(1, top, p + torch.arange(k, device=x.device).expand(b, -1))
        assign = torch.full((b, n), slot_rep, dtype=torch.long, device=x.device)
        assign[:, :p] = pre
        assign[:, p : p + rows.shape[1]] = slot_out.gather(1, rows)

        out_x = [x[:, :p], gather_tokens(tokens, top)]
        out_size = [signals.size[:, :p], gather_tokens(size, top)]
        if rep is not None:
            out_x.append(rep)
            out_size.append(rep_size)
            index = torch.cat([index, index.new_full((b, 1), -1)], dim=1)
        out = Reduction(
            x=torch.cat(out_x, 1), size=torch.cat(out_size, 1), index=index, assign=assign
        )
        if k < m:
            signals.state[STATE_KEY] = dict(
                tokens=tokens, size=size, g=g, top=top, rep=rep, n_out=out.num_tokens
            )
        else:
            signals.state.pop(STATE_KEY, None)  # every token restored: the chain ends
        return out
