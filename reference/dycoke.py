"""DyCoke: Dynamic Compression of Tokens.

Paper: "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language
Models", https://arxiv.org/abs/2411.15024
Official code: https://github.com/KD-TAO/DyCoke (``llava/model/llava_arch.py``:
``dycole_ttm``; ``llava/model/language_model/modeling_qwen2.py``:
``PrunableDynamicCache``)

Algorithm (training-free):
1. Temporal token merging (TTM), before the LLM: in every pair of frames
   ``(2t, 2t + 1)``, compare each token of the odd frame with the token at the
   same position of the even frame (cosine similarity) and keep only the
   ``int((1 - K) * P)`` least similar ones; the duplicates are represented by
   the pivot frame's token.
2. Then, per window of four frames ``(4t .. 4t + 3)``, prune frame ``4t + 2``
   against frame ``4t`` the same way.
3. Dynamic KV-cache pruning (``dycoke_decode_step``), while decoding: from layer
   ``L`` on, attend only to the ``int((1 - p) * Nv)`` image tokens the current
   token attended most in layer ``L - 1``; the selection is renewed when that
   attention changes (cosine similarity to the previous step below 0.9).

Deviations from the official code:
- Host mapping (the ``inti``/``rlt`` convention): a video is one frame-major
  sequence of ``T x P`` tokens after the protected prefix, ``frame_tokens = P``;
  TTM is a vision-stage ``TokenReducer`` (``where = "pre"``: put it on a block
  whose output feeds the projector, or on the LLaVA host's vision layer). The
  official TTM runs on the projected features of each video.
- Order: by default (``order="similarity"``) the kept tokens of a pruned frame
  come in the official order, by increasing similarity to the pivot
  (``topk(largest=False)``); ``order="spatial"`` keeps them in spatial order.
- A dropped token is ``assign``-ed to the pivot token at its position (the one
  that represents it), whose ``size`` absorbs it; tokens are not averaged, as
  in the official code.
- An odd last frame and tokens that do not fill a whole frame are carried
  through; the official loop silently drops an odd last frame. Step 2 follows
  the official ``range(0, T - 4, 4)``, which skips the last complete window.
- KV-cache pruning is an unregistered helper on top of the LLaVA host's cache
  (it masks the unselected image keys, equivalent to the official gather); it
  assumes no LLM-stage reducer changed the per-layer caches, and takes the image
  span from the caller. As in the official code, a step whose attention did not
  change runs on the full cache (the official ``kv_cache`` is reset every step
  and only set when the similarity is below the threshold). Per sample, where
  the official code reads batch item 0.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity, keep_tokens
from reference.hosts.llava import LlavaHost
from reference.registry import register


def prune_against(frames: Tensor, pivot: int, target: int, keep: int) -> tuple[Tensor, Tensor]:
    """Frame ``target``'s ``keep`` tokens least similar to ``pivot``.

    Returns the keep mask ``[B, P]`` and each token's rank by increasing similarity
    ``[B, P]`` (the official output order of the kept ones).
    """
    with torch.no_grad():
        sim = F.cosine_similarity(frames[:, target].float(), frames[:, pivot].float(), dim=-1)
        low = sim.topk(keep, dim=1, largest=False).indices  # [B, keep], least similar first
        rank = torch.arange(sim.shape[1], device=sim.device).expand_as(sim).clone()
        rank.scatter_(1, low, torch.arange(keep, device=sim.device).expand(sim.shape[0], -1))
    return torch.zeros_like(sim, dtype=torch.bool).scatter(1, low, True), rank


def ttm_plan(frames: Tensor, ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """Temporal token merging on ``frames [B, T, P, C]``.

    Returns ``keep [B, T, P]``; ``rep [B, T, P]``: for each token, the frame of the
    token that represents it (itself when kept; its pivot's, transitively); and
    ``rank [B, T, P]``: a kept token's slot within its frame in the official order
    (spatial, except in pruned frames: by increasing similarity).
    """
    b, t, p, _ = frames.shape
    keep_n = int((1 - ratio) * p)
    keep = torch.ones(b, t, p, dtype=torch.bool, device=frames.device)
    rank = torch.arange(p, device=frames.device).expand(b, t, p).clone()
    rep = torch.arange(t, device=frames.device)[None, :, None].expand(b, t, p).clone()
    for i in range(0, t - 1, 2):  # step 1: odd frame against its even partner
        keep[:, i + 1], rank[:, i + 1] = prune_against(frames, i, i + 1, keep_n)
        rep[:, i + 1] = torch.where(keep[:, i + 1], i + 1, i)
    for i in range(0, t - 4, 4):  # step 2: frame 4t + 2 against frame 4t (official range)
        keep[:, i + 2], rank[:, i + 2] = prune_against(frames, i, i + 2, keep_n)
        rep[:, i + 2] = torch.where(keep[:, i + 2], i + 2, i)
    # Frame 4t + 3 may point at a dropped token of 4t + 2: follow it to 4t.
    return keep, rep.gather(1, rep), rank


@register
class DyCoke(TokenReducer):
    """DyCoke's temporal token merging over a frame-major video token sequence.

    Args:
        frame_tokens: tokens per frame ``P``; 0 turns the step off.
        ratio: the paper's ``K``, the fraction of a pruned frame's tokens removed.
        order: ``"similarity"`` (official): a pruned frame's kept tokens by increasing
            similarity to its pivot; ``"spatial"``: in spatial order.
    """

    catalog_id = "dycoke"
    kind = "merging"
    where = "pre"
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"frame_tokens": 0},
        "some": {"frame_tokens": 4, "ratio": 0.5},
    }

    def __init__(self, frame_tokens: int = 196, ratio: float = 0.7, order: str = "similarity"):
        super().__init__()
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if frame_tokens < 0:
            raise ValueError(f"frame_tokens must be >= 0, got {frame_tokens}")
        if order not in ("similarity", "spatial"):
            raise ValueError(f"order must be 'similarity' or 'spatial', got {order!r}")
        self.frame_tokens, self.ratio, self.order = frame_tokens, ratio, order

    def _frames(self, n: int, prefix: int) -> int:
        return (n - prefix) // self.frame_tokens if self.frame_tokens > 0 else 0

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        t = self._frames(n, prefix)
        pruned = t // 2 + len(range(0, t - 4, 4))
        out = n - pruned * (self.frame_tokens - int((1 - self.ratio) * self.frame_tokens))
        return out, out

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, c = x.shape
        prefix, p = signals.prefix, self.frame_tokens
        t = self._frames(n, prefix)
        if t < 2:
            return identity(x, signals.size)
        if b == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(n, prefix)[0])
        body = slice(prefix, prefix + t * p)
        frames = x[:, body].reshape(b, t, p, c)  # 'b (t p) c -> b t p c'
        keep, rep, rank = ttm_plan(frames, self.ratio)
        keep_all = torch.cat([keep.flatten(1), keep.new_ones(b, n - body.stop)], 1)  # tail kept
        kept = torch.arange(prefix, n, device=x.device)[None].expand(b, -1)[keep_all].view(b, -1)

        pos = torch.arange(p, device=x.device)
        head = (prefix + rep * p + pos).flatten(1)  # [B, T P] token index of the representative
        size = signals.size.clone()
        size[:, body] = torch.zeros_like(signals.size).scatter_add(
            1, head[..., None], signals.size[:, body]
        )[:, body]
        out = keep_tokens(x, size, prefix, kept)  # spatial order
        if self.order == "similarity":  # reorder within each frame by the official slot
            slot = rank + p * torch.arange(t, device=x.device)[:, None]  # [B, T, P]
            tail = torch.arange(t * p, n - prefix, device=x.device).expand(b, -1)
            slot = torch.cat([slot.flatten(1), tail], 1)[keep_all].view(b, -1)
            perm = torch.cat([out.index[:, :prefix], slot.argsort(1) + prefix], 1)  # [B, N']
            inverse = perm.argsort(1)
            out = Reduction(
                x=out.x.gather(1, perm[..., None].expand(-1, -1, c)),
                size=out.size.gather(1, perm[..., None]),
                index=out.index.gather(1, perm),
                assign=torch.where(out.assign < 0, -1, inverse.gather(1, out.assign.clamp(min=0))),
            )
        assign = out.assign.clone()
        assign[:, body] = out.assign.gather(1, head)
        return Reduction(x=out.x, size=out.size, index=out.index, assign=assign)


@torch.no_grad()
def dycoke_decode_step(
    host: LlavaHost,
    token_ids: Tensor,
    cache: dict,
    image_start: int,
    image_len: int,
    layer: int = 3,
    ratio: float = 0.8,
    threshold: float = 0.9,
    state: dict | None = None,
) -> Tensor:
    """One decoding step of ``host`` with DyCoke's dynamic KV-cache pruning.

    Layers ``< layer`` attend to the whole cache; layers ``>= layer`` only to the
    top ``int((1 - ratio) * image_len)`` image tokens of the current token's
    head-averaged attention in layer ``layer - 1``, for samples whose attention
    changed (cosine similarity below ``threshold``, always on the first step).
    ``state`` carries the previous attention across steps (pass the same dict) and
    returns the step's ``"pruned"`` image tokens ``[B, Nv]``. Needs ``layer >= 1``.
    Nothing is deleted from ``cache``: pruned tokens may come back later.

    Returns the logits ``[B, vocab]``; updates ``cache`` like ``host.decode``.
    """
    state = {} if state is None else state
    h = host.embed_tokens(token_ids[:, None])  # [B, 1, hidden]
    positions = cache["next_pos"][:, None]
    b = token_ids.shape[0]
    drop = None  # [B, Nk] image keys hidden from layers >= layer
    for i, (block, layer_cache) in enumerate(zip(host.layers, cache["layers"], strict=True)):
        layer_cache["valid"] = torch.cat(
            [layer_cache["valid"], torch.ones_like(token_ids[:, None], dtype=torch.bool)], 1
        )
        mask = layer_cache["valid"][:, None, None, :]  # [B, 1, 1, Nk]
        if i >= layer and drop is not None:
            mask = mask & ~drop[:, None, None, :]
        needs = frozenset({"last_attn"}) if i == layer - 1 else frozenset()
        last = torch.zeros(b, dtype=torch.long, device=h.device)
        h, signals = block(h, positions, mask, layer_cache, needs, last)
        if i != layer - 1:
            continue
        att = signals["last_attn"].float().mean(1)[:, image_start : image_start + image_len]
        prev = state.get("attention")
        sim = torch.zeros(b, device=h.device)
        if prev is not None:
            sim = F.cosine_similarity(att, prev, dim=-1)
        state["attention"] = att
        top = att.topk(int(image_len * (1 - ratio)), dim=1).indices  # [B, k]
        pruned = torch.ones_like(att, dtype=torch.bool).scatter(1, top, False)
        pruned = pruned & (sim < threshold)[:, None]  # unchanged attention: full cache
        state["pruned"] = pruned  # [B, Nv] image tokens hidden from layers >= layer
        drop = torch.zeros_like(layer_cache["valid"])
        drop[:, image_start : image_start + image_len] = pruned
    cache["next_pos"] = cache["next_pos"] + 1
    return host.lm_head(host.norm(h))[:, 0]
