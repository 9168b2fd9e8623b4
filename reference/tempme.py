"""TempMe: temporal token merging across frames inside CLIP's image encoder.

Paper: "TempMe: Video Temporal Token Merging for Efficient Text-Video Retrieval",
https://arxiv.org/abs/2409.01156
Official code: https://github.com/LunarShen/TempMe, ``tvr/models/module_tome_patch.py``
(``ToMeBlock.forward``), ``tvr/models/module_tome_merge.py`` (``bipartite_soft_matching``,
``merge_wavg``), scheduled by ``tvr/models/modeling.py`` (``get_video_feat``).

Algorithm (Fig. 2's progressive multi-granularity framework; ViT-B/32, 12 frames of 50 tokens):
1. ImgMe blocks 0-7 merge tokens within each frame (ToMe: ``r = 2`` after attention, on the
   head-averaged keys; sizes feed proportional attention).
2. ClipMe blocks 8, 9, 10 first join 2, 2, 3 neighbouring frames (then clips) into one clip:
   its CLS tokens first, then all its patches; a learned per-frame temporal embedding is added
   and 30% of the clip's tokens are merged by bipartite soft matching on the block's input
   tokens (cross-clip merging: a size-weighted average; CLS tokens are never merged).
3. After attention, blocks 8-11 merge 10% of each clip's tokens within the clip (intra-clip
   merging, on the keys). The 12 CLS tokens, averaged, embed the video: 600 tokens become 97.

Host mapping (``dycoke.py``'s convention): a video is one frame-major sequence of ``T`` groups of
``frame_tokens`` tokens after the protected prefix; each group's first ``frame_cls`` tokens are
its own protected CLS tokens (``1`` for CLIP frames; a clip of ``M`` frames has ``M``). One
instance is one merge step: ``merge_frames > 1`` is step 2 (``where = "pre"``, before the
block's attention, as the official), ``merge_frames = 1`` step 1 or 3 (``where = "mid"``, on
the block's keys). ``official_schedule`` lists the official steps with their arguments;
``official_reducers`` builds them by block for ``vit.apply`` or ``reference.attach``: blocks
8-10 take a ``(join, merge)`` pair, a "pre" and a "mid" method, as the hosts allow.

Deviations from the official code:
- Groups after the last whole clip (``T`` not a multiple of ``merge_frames``, which the
  official asserts) and tokens that fill no whole group are carried through unchanged.
- ``TVPt_Video_Positional_embedding`` (``[1, frame_num, 1, dim]``, zero-initialised, trained)
  is built only with ``frame_num > 0``; the input must then have ``frame_num`` groups. The
  official LoRA of the attention (``TVPt_LoRA_*``) belongs to the encoder, not here.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity
from reference.registry import register


def merge_plan(metric: Tensor, r: int, cls: int) -> tuple[Tensor, ...]:
    """Bipartite soft matching of one group's non-CLS tokens, ``metric [G, L, D]`` (CLS first).

    The two sets alternate as in a full-sequence ToMe: with an odd ``cls`` count the A set
    (merged from) is the odd patch positions, with an even count the even ones.

    Returns ``a [La]`` and ``b [Lb]`` (patch positions of the sets), ``unm [G, La - r]``
    (A tokens kept, in input order), ``src [G, r]`` (A tokens merged) and their
    destinations ``dst [G, r]``, as positions within A and B.
    """
    n = metric.shape[1] - cls
    pos = torch.arange(n, device=metric.device)
    a, b = (pos[0::2], pos[1::2]) if cls % 2 == 0 else (pos[1::2], pos[0::2])
    with torch.no_grad():
        m = metric[:, cls:]
        m = m / m.norm(dim=-1, keepdim=True)
        scores = m[:, a] @ m[:, b].transpose(-1, -2)  # [G, La, Lb]
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unm = edge_idx[:, r:].sort(dim=1).values
        src = edge_idx[:, :r]
        dst = node_idx.gather(1, src)
    return a, b, unm, src, dst


def merge_groups(
    x: Tensor,
    size: Tensor,
    metric: Tensor,
    prefix: int,
    group_tokens: int,
    merge_frames: int,
    cls: int,
    r: int,
    embed: Tensor | None = None,
) -> Reduction:
    """One TempMe step on ``x [B, N, C]``: every ``merge_frames`` groups of ``group_tokens``
    tokens after the prefix become one group (their CLS first), of which ``r`` non-CLS tokens
    are merged into others by a size-weighted average (``merge_wavg``).

    ``metric [B, N, D]`` chooses the merges (the tokens or the keys); ``embed [T, C]`` (the
    temporal embedding of each group) is added to ``x`` before merging, as the official.
    """
    b, n, c = x.shape
    p, m = group_tokens, merge_frames
    k = (n - prefix) // (p * m)  # clips
    dev = x.device
    # input positions of each clip in the official order: the frames' CLS, then their patches
    frame = prefix + p * torch.arange(k * m, device=dev).view(k, m, 1)
    tok = torch.arange(p, device=dev)
    order = torch.cat([(frame + tok[:cls]).flatten(1), (frame + tok[cls:]).flatten(1)], 1)
    if embed is not None:
        x = x.clone()
        x[:, prefix : prefix + k * m * p] += embed[: k * m].repeat_interleave(p, 0)
    clip_cls = m * cls
    a, bb, unm, src, dst = merge_plan(
        metric.float()[:, order.flatten()].view(b * k, -1, metric.shape[-1]), r, clip_cls
    )
    # per clip: [CLS, kept A, B (some absorbing merged A)] as positions into ``order``
    a_unm = clip_cls + a[unm]  # [B K, La - r]
    b_all = (clip_cls + bb).expand(b * k, -1)
    heads = torch.arange(clip_cls, device=dev).expand(b * k, -1)
    kept = torch.cat([heads, a_unm, b_all], 1)  # [B K, L - r]
    per = kept.shape[1]
    slot_of = torch.full((b * k, order.shape[1]), -1, dtype=torch.long, device=dev)
    slot_of.scatter_(1, kept, torch.arange(per, device=dev).expand(b * k, -1))
    slot_of.scatter_(1, clip_cls + a[src], clip_cls + a.shape[0] - r + dst)  # merged A -> its B

    flat = order.expand(b, -1, -1).reshape(b * k, -1)  # [B K, L] token index
    index = flat.gather(1, kept).view(b, k * per)
    slot = (slot_of + per * torch.arange(k, device=dev).repeat(b)[:, None]).view(b, -1)
    tail = torch.arange(prefix + k * m * p, n, device=dev)
    pre = torch.arange(prefix, device=dev)
    index = torch.cat([pre.expand(b, -1), index, tail.expand(b, -1)], 1)
    assign = torch.empty(b, n, dtype=torch.long, device=dev)
    assign[:, :prefix] = pre
    assign.scatter_(1, flat.view(b, -1), prefix + slot)
    assign[:, prefix + k * m * p :] = prefix + k * per + torch.arange(tail.numel(), device=dev)

    weighted = torch.zeros(b, index.shape[1], c, dtype=x.dtype, device=dev)
    weighted = weighted.scatter_add(1, assign[..., None].expand(-1, -1, c), x * size)
    total = torch.zeros(b, index.shape[1], 1, dtype=size.dtype, device=dev)
    total = total.scatter_add(1, assign[..., None], size)
    out = weighted / total
    out[:, :prefix] = x[:, :prefix]  # exact, not through the weighted sum
    return Reduction(x=out, size=total, index=index, assign=assign)


@register
class TempMe(TokenReducer):
    """One TempMe merge step over frame-major groups of ``frame_tokens`` tokens.

    Args:
        frame_tokens: tokens per group (frame or clip) at this block, CLS included; 0: off.
        merge_frames: groups joined into one clip before merging (``merge_frame_num``);
            1 merges within each group.
        ratio: fraction of the (joined) group's tokens merged (``merge_token_proportion``:
            0.3 across frames, 0.1 within a clip); ignored where ``r`` is given.
        r: tokens merged per group, as the official ``tome_r`` of blocks 0-7.
        frame_cls: protected CLS tokens at the front of each group.
        frame_num: groups expected, for the temporal embedding (0: no embedding).
        dim: token width of the temporal embedding.
    """

    catalog_id = "tempme"
    kind = "merging"
    needs = frozenset({"keys"})
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"frame_tokens": 0},
        "some": {"frame_tokens": 4, "merge_frames": 2, "ratio": 0.5, "frame_cls": 0},
    }

    def __init__(
        self,
        frame_tokens: int = 34,
        merge_frames: int = 2,
        ratio: float = 0.3,
        r: int | None = None,
        frame_cls: int = 1,
        frame_num: int = 0,
        dim: int = 0,
    ):
        super().__init__()
        if frame_tokens < 0:
            raise ValueError(f"frame_tokens must be >= 0, got {frame_tokens}")
        if merge_frames < 1:
            raise ValueError(f"merge_frames must be >= 1, got {merge_frames}")
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if r is not None and r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        if frame_cls < 0 or (frame_tokens and frame_cls >= frame_tokens):
            raise ValueError(f"frame_cls must be in [0, frame_tokens), got {frame_cls}")
        if frame_num < 0 or (frame_num and frame_num % merge_frames):
            raise ValueError(f"frame_num must be a multiple of merge_frames, got {frame_num}")
        self.frame_tokens, self.merge_frames, self.ratio = frame_tokens, merge_frames, ratio
        self.r, self.frame_cls, self.frame_num = r, frame_cls, frame_num
        if merge_frames > 1:  # joins frames before the block's attention, on the tokens
            self.where, self.needs = "pre", frozenset()
        if frame_num > 0:
            self.TVPt_Video_Positional_embedding = nn.Parameter(torch.zeros(1, frame_num, 1, dim))

    def merged(self) -> int:
        """Tokens merged per clip (``get_video_feat``'s ``M_token_num``, with its caps)."""
        p, m, cls = self.frame_tokens, self.merge_frames, self.frame_cls
        r = int(p * m * self.ratio) if self.r is None else self.r
        return max(0, min((p - cls) * m // 2, r))

    def _clips(self, n: int, prefix: int) -> int:
        if self.frame_tokens == 0:
            return 0
        return (n - prefix) // (self.frame_tokens * self.merge_frames)

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        out = n - self._clips(n, prefix) * self.merged()
        return out, out

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        k, r = self._clips(x.shape[1], signals.prefix), self.merged()
        if k == 0 or (r == 0 and self.merge_frames == 1):
            return identity(x, signals.size)
        if x.shape[0] == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(x.shape[1], signals.prefix)[0])
        embed = None
        if self.frame_num > 0:
            groups = (x.shape[1] - signals.prefix) // self.frame_tokens
            if groups != self.frame_num:
                raise ValueError(
                    f"frame_num must be the {groups} groups given, got {self.frame_num}"
                )
            if r > 0:  # the official adds it only where it merges
                embed = self.TVPt_Video_Positional_embedding[0, :, 0].to(x.dtype)
        metric = x.detach() if self.merge_frames > 1 else signals.keys
        return merge_groups(
            x,
            signals.size,
            metric,
            signals.prefix,
            self.frame_tokens,
            self.merge_frames,
            self.frame_cls,
            r,
            embed,
        )

    @classmethod
    def official_reducers(
        cls, frames: int = 12, tokens: int = 50, dim: int = 768
    ) -> dict[int, TempMe | tuple[TempMe, TempMe]]:
        """``official_schedule`` as methods by block: one step, or a (join, merge) pair."""
        by_block: dict[int, list[TempMe]] = {}
        for block, kwargs in cls.official_schedule(frames, tokens, dim):
            by_block.setdefault(block, []).append(cls(**kwargs))
        return {b: steps[0] if len(steps) == 1 else tuple(steps) for b, steps in by_block.items()}

    @classmethod
    def official_schedule(
        cls, frames: int = 12, tokens: int = 50, dim: int = 768
    ) -> list[tuple[int, dict]]:
        """The official ViT-B/32 steps (``main.py`` defaults: ``tome_r=2``, merge layers
        8-9-10 joining 2-2-3, proportions 30-10, ``frame_pos=1``) as ``(block, kwargs)``
        in order; a merge block appears twice, its join ("pre") before its merge ("mid")."""
        steps, p, c, t = [], tokens, 1, frames
        for block in range(12):
            if block < 8:
                steps.append((block, dict(frame_tokens=p, merge_frames=1, r=2, frame_cls=c)))
                p -= min(2, (p - c) // 2)
                continue
            if block in (8, 9, 10):
                m = {8: 2, 9: 2, 10: 3}[block]
                join = dict(frame_tokens=p, merge_frames=m, ratio=0.3, frame_cls=c)
                steps.append((block, {**join, "frame_num": t, "dim": dim}))
                p, c, t = p * m - cls(**join).merged(), c * m, t // m
            steps.append((block, dict(frame_tokens=p, merge_frames=1, ratio=0.1, frame_cls=c)))
            p -= cls(frame_tokens=p, merge_frames=1, ratio=0.1, frame_cls=c).merged()
        return steps
