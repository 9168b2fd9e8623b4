"""FastVID: dynamic density pruning of video tokens before the language model.

Paper: "FastVID: Dynamic Density Pruning for Fast Video Large Language Models"
(NeurIPS 2025), https://arxiv.org/abs/2503.11187
Official code: https://github.com/LunarShen/FastVID (read at commit a40a109):
``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py``,
``Qwen2Model.forward``, the block between the ``FastVID`` markers; settings from
``fastvid_llavaonevision/scripts/eval.sh`` (LLaVA-OneVision, the paper's main setting).

Algorithm (Sec. 3):
1. DySeg: cut the video after frame ``t`` where the cosine similarity of the global
   features of frames ``t`` and ``t + 1`` is among the ``c - 1`` lowest or below ``tau``.
2. Per frame, keep ``R = int(P * ratio)`` tokens: the ``S = R - int(R * d)`` most
   salient (ATS, the vision encoder's attention), and ``R - S`` context tokens.
3. DTM: the context tokens are density peaks (DPC-kNN, 4 neighbours) among a frame's
   remaining tokens. A one-frame segment merges its own remaining tokens into its
   anchors; a longer segment gives its anchors to every ``p``-th frame counted from
   its end (``floor(ctx * L / ceil(L / p))`` each), and each such frame's anchors
   absorb the remaining tokens of the whole segment. A merged anchor is
   ``w * anchor + (1 - w) * mean(assigned)``, ``w = max(1 / (n + 1), beta)``.
4. Kept tokens stay in their original order (and positions).

Deviations from the official code:
- Host mapping (DyCoke's convention): a video is one frame-major sequence of
  ``T x P`` tokens after the protected prefix, ``frame_tokens = P``; tokens that do
  not fill a frame are carried through. ``where = "pre"``: a block whose output feeds
  the projector, or the LLaVA host's vision layer. The official block runs on the
  projected, 2x2-pooled LLM input embeddings of one video.
- Signals: the saliency is ``state["fastvid.saliency"]`` ``[B, T P]`` when given,
  else the head-mean CLS attention row (the official code uses SigLIP's attention-
  pooling head, pooled like the tokens); the frame features are
  ``state["fastvid.global"]`` ``[B, T, D]`` when given, else each frame's token mean
  (officially the pooling head's output).
- Per sample (the official code is batch-1): each sample's count depends on its
  segments, so samples are padded with empty slots (``Reduction.mask`` 0), and empty
  slots of an earlier reduction are left out (``each_present_sample``).
- The densities get the official ``1e-6 * torch.rand`` tie-break only with
  ``noise=True`` (the default; it draws from the global generator, so a result depends
  on its state); ``noise=False`` is deterministic and per sample.
- Where a count exceeds what a frame has (``c - 1 > T - 1``, 4 neighbours, an
  anchor count above ``P - S``), it is clamped; the official code would raise.
- ``assign``: a token merged in a longer segment goes to the anchor it chose in the
  nearest anchor frame at or after it (it is averaged into every anchor frame's
  choice); ``size`` counts what ``assign`` sends to each kept token.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity
from reference.ops import each_present_sample
from reference.registry import register

SALIENCY, GLOBAL = "fastvid.saliency", "fastvid.global"


def segments(glob: Tensor, c: int, tau: float) -> list[int]:
    """DySeg: segment lengths for frame features ``glob [T, D]``."""
    t = glob.shape[0]
    if t < 2:
        return [t]
    g = F.normalize(glob.float(), dim=1)
    sim = (g[:-1] * g[1:]).sum(1)  # [T - 1]
    low = sim.topk(min(c - 1, t - 1), largest=False).indices
    cuts = torch.unique(torch.cat([low, (sim < tau).nonzero()[:, 0]])).tolist()
    return [b - a for a, b in zip([-1, *cuts], [*cuts, t - 1], strict=True)]


def density_score(tok: Tensor, dim: int, noise: bool) -> Tensor:
    """DPC-kNN score ``[T, M]`` of each frame's tokens ``tok [T, M, C]`` (4 neighbours)."""
    dist = torch.cdist(tok.float(), tok.float()) / dim**0.5  # [T, M, M]
    knn = dist.topk(min(4, tok.shape[1]), dim=-1, largest=False).values
    density = (-(knn**2).mean(-1)).exp()
    if noise:
        density = density + torch.rand(density.shape, device=tok.device) * 1e-6
    denser = density[:, None, :] > density[:, :, None]  # [T, i, j]: j denser than i
    far = dist.flatten(1).max(-1).values[:, None, None]
    return torch.where(denser, dist, far).min(-1).values * density


def merge_into(anchors: Tensor, tokens: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """DTM: each of ``tokens [M, C]`` joins its most similar anchor of ``anchors [A, C]``.

    Returns the merged anchors ``[A, C]`` and each token's anchor ``[M]``.
    """
    with torch.no_grad():
        choice = (F.normalize(tokens, dim=-1) @ F.normalize(anchors, dim=-1).T).argmax(1)
    count = torch.zeros(anchors.shape[0], device=tokens.device, dtype=tokens.dtype)
    count = count.index_add(0, choice, torch.ones_like(choice, dtype=tokens.dtype))
    w = (1 / (count + 1)).clamp(min=beta)[:, None]
    mean = (
        anchors.new_zeros(anchors.shape).index_add(0, choice, tokens) / count.clamp(min=1)[:, None]
    )
    return w * anchors + (1 - w) * mean, choice


@register
class FastVID(TokenReducer):
    """FastVID's segment-wise pruning and density merging of frame-major video tokens.

    Args:
        frame_tokens: tokens per frame ``P``; 0 turns the method off.
        ratio: retention ratio (official 0.10).
        c: DySeg's fixed number of segments (official 8).
        tau: DySeg's similarity threshold (official 0.9).
        d: fraction of the retained tokens that are context tokens (official 0.4).
        p: DTM's anchor-frame stride in a segment (official 4).
        beta: DTM's least anchor weight (official 0.6).
        noise: the official random tie-break of densities.
    """

    catalog_id = "fastvid"
    kind = "pruning"
    where = "pre"
    needs = frozenset({"cls_attn"})
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"frame_tokens": 0},
        "some": {"frame_tokens": 4, "ratio": 0.75, "c": 2, "noise": False},
    }

    def __init__(
        self,
        frame_tokens: int = 196,
        ratio: float = 0.10,
        c: int = 8,
        tau: float = 0.9,
        d: float = 0.4,
        p: int = 4,
        beta: float = 0.6,
        noise: bool = True,
    ):
        super().__init__()
        if frame_tokens < 0:
            raise ValueError(f"frame_tokens must be >= 0, got {frame_tokens}")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if not 0 <= d <= 1:
            raise ValueError(f"d must be in [0, 1], got {d}")
        if c < 1:
            raise ValueError(f"c must be >= 1, got {c}")
        if p < 1:
            raise ValueError(f"p must be >= 1, got {p}")
        self.frame_tokens, self.ratio, self.c, self.tau = frame_tokens, ratio, c, tau
        self.d, self.p, self.beta, self.noise = d, p, beta, noise

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        # An image is one frame: ``keep`` tokens, 60% salient and 40% density anchors.
        return {"vision": cls(frame_tokens=n_image, ratio=(keep + 0.5) / n_image)}

    def counts(self) -> tuple[int, int]:
        """Salient and context tokens per frame (official ``int`` truncations)."""
        r = int(self.frame_tokens * self.ratio)
        s = r - int(r * self.d)
        return s, r - s

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        t = (n - prefix) // self.frame_tokens if self.frame_tokens else 0
        if t == 0:
            return n, n
        s, ctx = self.counts()
        rest = n - t * self.frame_tokens
        low = rest + t * s + (-(-t // self.p) if ctx else 0)  # every anchor frame keeps one
        return low, rest + t * (s + ctx)

    def plan(self, frames: Tensor, saliency: Tensor, glob: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """FastVID on one video ``frames [T, P, C]``.

        Returns the kept flat token indices ``[K]`` (sorted), their tokens ``[K, C]`` and,
        for every input token, the flat index of the kept token it went into (``-1``).
        """
        t, p, c = frames.shape
        s, ctx = self.counts()
        dev = frames.device
        sizes = segments(glob, self.c, self.tau)
        per_frame = [0] * t  # anchors per frame (official frm_context_num_list)
        start = 0
        for n in sizes:
            each = ctx * n // -(-n // self.p)
            for j in range(n):
                if (n - 1 - j) % self.p == 0:
                    per_frame[start + j] = each
            start += n
        with torch.no_grad():
            salient = saliency.topk(s, dim=1).indices  # [T, S]
        rest = torch.ones(t, p, dtype=torch.bool, device=dev).scatter(1, salient, False)
        rest_idx = torch.arange(p, device=dev).expand(t, p)[rest].view(t, p - s)
        rest_tok = frames.gather(1, rest_idx[..., None].expand(-1, -1, c))  # [T, P - S, C]
        flat = torch.arange(t, device=dev)[:, None] * p
        kept = [(flat + salient).flatten()]
        values = [frames.gather(1, salient[..., None].expand(-1, -1, c)).flatten(0, 1)]
        rep = torch.full((t * p,), -1, dtype=torch.long, device=dev)
        rep[kept[0]] = kept[0]
        if ctx and p > s:
            with torch.no_grad():
                score = density_score(rest_tok, c, self.noise)  # [T, P - S]
            start = 0
            for n in sizes:
                frames_in = range(start, start + n)
                anchor_frames = [f for f in frames_in if per_frame[f] > 0]
                # A token is represented by the nearest anchor frame at or after it.
                owner = {g: min(f for f in anchor_frames if f >= g) for g in frames_in}
                for f in anchor_frames:
                    # One-frame DTM for frames holding exactly ``ctx`` anchors (official).
                    span = [f] if per_frame[f] == ctx else list(frames_in)
                    top = score[f].topk(min(per_frame[f], p - s)).indices
                    merged, choice = merge_into(
                        rest_tok[f, top], rest_tok[span].flatten(0, 1), self.beta
                    )
                    anchor = f * p + rest_idx[f, top]
                    kept.append(anchor)
                    values.append(merged)
                    src = torch.cat([g * p + rest_idx[g] for g in span])  # [len(span) (P - S)]
                    mine = torch.tensor([owner[g] == f for g in span], device=dev)
                    mine = mine.repeat_interleave(p - s)
                    rep[src[mine]] = anchor[choice[mine]]
                start += n
        kept_all, values_all = torch.cat(kept), torch.cat(values)
        order = kept_all.argsort()
        return kept_all[order], values_all[order], rep

    def _one(self, x: Tensor, size: Tensor, prefix: int, saliency: Tensor, glob: Tensor | None):
        """FastVID on one sample ``x [1, N, C]``; ``saliency [N - prefix]``."""
        n, c, p = x.shape[1], x.shape[2], self.frame_tokens
        t = (n - prefix) // p if p else 0
        if t == 0:
            return identity(x, size)
        body = x[0, prefix : prefix + t * p].view(t, p, c)  # 'b (t p) c -> b t p c'
        glob = body.float().mean(1) if glob is None else glob
        keep, values, rep = self.plan(body, saliency[: t * p].view(t, p), glob)
        dev = x.device
        index = torch.cat(
            [
                torch.arange(prefix, device=dev),
                prefix + keep,
                torch.arange(prefix + t * p, n, device=dev),
            ]
        )
        out = x[0, index].clone()
        out[prefix : prefix + keep.shape[0]] = values
        slot_of = torch.full((n,), -1, dtype=torch.long, device=dev)
        slot_of[index] = torch.arange(index.shape[0], device=dev)
        assign = slot_of.clone()
        body_rep = rep + prefix
        assign[prefix : prefix + t * p] = torch.where(rep >= 0, slot_of[body_rep.clamp(min=0)], -1)
        new_size = torch.zeros(index.shape[0], 1, dtype=size.dtype, device=dev)
        ok = assign >= 0
        new_size.index_add_(0, assign[ok], size[0, ok])
        return Reduction(out[None], new_size[None], index[None], assign[None])

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, _ = x.shape
        prefix, p = signals.prefix, self.frame_tokens
        if p == 0 or (n - prefix) // p == 0:
            return identity(x, signals.size)
        if b == 0:
            return empty_batch(x, signals.size, self.budget(n, prefix)[0])
        state = signals.state
        present = signals.present
        if present is None:
            present = torch.ones(b, n, dtype=torch.bool, device=x.device)
        if SALIENCY in state:
            sal = state[SALIENCY]  # [B, T P] over the tokens after the prefix
            sal = torch.cat(
                [sal.new_zeros(b, prefix), sal, sal.new_zeros(b, n - prefix - sal.shape[1])], 1
            )
        elif signals.cls_attn is not None:
            sal = signals.cls_attn.float().mean(1)  # [B, N]
        else:
            sal = x.new_zeros(b, n, dtype=torch.float)

        def reduce_one(i: int, tokens: Tensor) -> Reduction:
            glob = state[GLOBAL][i] if GLOBAL in state else None
            return self._one(
                x[i : i + 1, tokens],
                signals.size[i : i + 1, tokens],
                prefix,
                sal[i, tokens][prefix:],
                glob,
            )

        return each_present_sample(x, signals.size, present, reduce_one)
