"""PruneVid: merge static and similar video tokens, then prune by question attention.

Paper: "PruneVid: Visual Token Pruning for Efficient Video Large Language Models"
(Findings of ACL 2025), https://arxiv.org/abs/2412.16117
Official code: https://github.com/Visual-AI/PruneVid (read at commit b12600c), on PLLaVA:
``models/pllava/modeling_pllava.py`` (``merge_frames_dynamic``, ``cluster_dpc_knn``,
``refine_clusters``, ``segment_lengths``, ``spatial_merge_tokens``) and
``models/pllava/elastic_cache.py`` (``VTPWindowCache.process_attention``); settings from
``scripts/eval.sh`` (16 frames of 12x12 tokens, tau 0.8, temporal ratio 0.25,
cluster ratio 0.5, alpha 0.4 at decoder layer 10).

Algorithm (Sec. 3):
1. Temporal segments: cluster the frames' mean tokens with DPC-kNN (``int(T r_t)``
   clusters, 7 neighbours), keep each cluster's longest runs and give shorter runs to
   the longer neighbouring run (left on ties); each run is a window.
2. In a window, a position whose tokens' mean pairwise cosine similarity across frames
   exceeds ``tau`` is static: its tokens become their mean over the window. Static
   tokens, and each frame's dynamic tokens, are clustered spatially (DPC-kNN,
   ``int(n r_c)`` clusters, when more than 14) into cluster means. A window emits its
   static tokens, then each frame's dynamic tokens.
3. In the LLM (``PruneVidLLM``): after layer 10, each merged token's score is its
   largest attention from any text token after the video in any head; a window keeps
   the top ``int(alpha n)`` of its static tokens and of each frame's dynamic tokens.

Deviations from the official code:
- Host mapping (DyCoke's convention): a video is one frame-major sequence of
  ``T x P`` tokens after the protected prefix, ``frame_tokens = P``; tokens that do not
  fill a frame are carried through. ``where = "pre"``; the official merge runs on the
  projected (PLLaVA-pooled) features. Clamped where the official code would raise
  (7 neighbours with fewer than 7 frames or tokens).
- The merged tokens' window layout goes to ``state["prunevid.layout"]`` (per sample:
  ``(static, dynamic, frames)`` per window) for ``PruneVidLLM``, an unregistered
  ``LLMReducer`` (one registry entry per paper). The official step also prunes the
  KV caches of layers 0..10 after the fact; the host keeps those, so decoding there
  still sees every merged token.
- Per sample: counts depend on the video, so the vision stage pads samples with
  empty slots (``Reduction.mask`` 0); ``PruneVidLLM`` keeps a sample's own empty image
  slots to even out the counts (it raises where a sample has too few).
- DPC-kNN's official ``1e-6 * torch.rand`` density tie-break only with ``noise=True``
  (the default; the global generator). ``index`` names a member of each merged token
  (its cluster centre, first frame for static tokens); ``size`` counts its members.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity
from reference.hosts.llava import LLMReducer, LLMSignals
from reference.ops import each_present_sample, keep_image_tokens
from reference.registry import register

LAYOUT = "prunevid.layout"


def dpc_knn(x: Tensor, clusters: int, k: int, noise: bool) -> Tensor:
    """DPC-kNN cluster of each of ``x [M, C]`` (``[M]``, centres labelled by score rank)."""
    with torch.no_grad():
        dist = torch.cdist(x[None].float(), x[None].float())[0] / x.shape[-1] ** 0.5
        knn = dist.topk(min(k, x.shape[0]), dim=-1, largest=False).values
        density = (-(knn**2).mean(-1)).exp()
        if noise:
            density = density + torch.rand(1, density.shape[0], device=x.device)[0] * 1e-6
        denser = density[None, :] > density[:, None]
        delta = torch.where(denser, dist, dist.max()).min(-1).values
        centres = (delta * density).topk(clusters).indices
        label = dist[centres].argmin(0)
        label[centres] = torch.arange(clusters, device=x.device)
    return label


def refine_runs(labels: list[int]) -> list[int]:
    """Keep each label's longest runs (none if its longest has length 1); give every other
    run to the longer of its neighbouring runs (left on ties, label 0 with none)."""
    n, out = len(labels), list(labels)
    runs: dict[int, list[tuple[int, int]]] = {}
    i = 0
    while i < n:
        j = i
        while j + 1 < n and labels[j + 1] == labels[i]:
            j += 1
        runs.setdefault(labels[i], []).append((i, j))
        i = j + 1
    for spans in runs.values():
        longest = max(b - a + 1 for a, b in spans)
        for a, b in spans:
            if longest == 1 or b - a + 1 < longest:
                out[a : b + 1] = [-1] * (b - a + 1)
    i = 0
    while i < n:
        if out[i] != -1:
            i += 1
            continue
        a = i
        while i < n and out[i] == -1:
            i += 1
        left = right = None
        left_len = right_len = 0
        if a > 0:
            left, j = out[a - 1], a - 1
            while j >= 0 and out[j] == left:
                j -= 1
            left_len = a - 1 - j
        if i < n:
            right, j = out[i], i
            while j < n and out[j] == right:
                j += 1
            right_len = j - i
        label = left if left_len > right_len else right if right_len > left_len else left
        label = label if label is not None else (right if right is not None else 0)
        out[a:i] = [label] * (i - a)
    return out


def run_lengths(labels: list[int]) -> list[int]:
    starts = [0] + [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]]
    return [b - a for a, b in zip(starts, [*starts[1:], len(labels)], strict=True)]


@register
class PruneVid(TokenReducer):
    """PruneVid's token merging over a frame-major video token sequence.

    Args:
        frame_tokens: tokens per frame ``P``; 0 turns the method off.
        tau: static threshold on the mean cosine similarity (official 0.8); below -1,
            every position of a window is static.
        temporal_ratio: temporal clusters per frame (official 0.25).
        cluster_ratio: spatial clusters per token (official 0.5).
        cluster_above: cluster only sets of more tokens than this (official 14).
        k: DPC-kNN neighbours (official 7).
        noise: the official random tie-break of densities.
    """

    catalog_id = "prunevid"
    kind = "merging"
    where = "pre"
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"frame_tokens": 0},
        "some": {"frame_tokens": 4, "tau": -2.0, "noise": False},
    }

    def __init__(
        self,
        frame_tokens: int = 144,
        tau: float = 0.8,
        temporal_ratio: float = 0.25,
        cluster_ratio: float = 0.5,
        cluster_above: int = 14,
        k: int = 7,
        noise: bool = True,
    ):
        super().__init__()
        if frame_tokens < 0:
            raise ValueError(f"frame_tokens must be >= 0, got {frame_tokens}")
        if not 0 < temporal_ratio <= 1:
            raise ValueError(f"temporal_ratio must be in (0, 1], got {temporal_ratio}")
        if not 0 < cluster_ratio <= 1:
            raise ValueError(f"cluster_ratio must be in (0, 1], got {cluster_ratio}")
        if not tau <= 1:
            raise ValueError(f"tau must be <= 1, got {tau}")
        if cluster_above < 0 or k < 1:
            raise ValueError(f"cluster_above must be >= 0 and k >= 1, got {cluster_above}, {k}")
        self.frame_tokens, self.tau, self.noise = frame_tokens, tau, noise
        self.temporal_ratio, self.cluster_ratio = temporal_ratio, cluster_ratio
        self.cluster_above, self.k = cluster_above, k

    def _size(self, m: int) -> int:
        return int(m * self.cluster_ratio) if m > self.cluster_above else m

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        p = self.frame_tokens
        t = (n - prefix) // p if p else 0
        if t < 2:
            return n, n
        rest = n - t * p
        low = rest + min(self._size(s) + self._size(p - s) for s in range(p + 1))
        # Windows span at least two frames (refined runs); below -1 every position is static.
        return low, rest + (t // 2) * self._size(p) if self.tau < -1 else n

    def _group(self, tok: Tensor, members: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Spatially cluster ``tok [M, C]`` (each standing for ``members[i]``) if large."""
        m = tok.shape[0]
        if m <= self.cluster_above:
            return tok, members
        c = int(m * self.cluster_ratio)
        label = dpc_knn(tok, c, self.k, self.noise)
        count = torch.zeros(c, device=tok.device).index_add_(
            0, label, torch.ones(m, device=tok.device)
        )
        mean = tok.new_zeros(c, tok.shape[1]).index_add_(0, label, tok) / count.clamp(min=1)[
            :, None
        ].to(tok.dtype)
        groups = [
            torch.cat([members[i] for i in (label == j).nonzero()[:, 0].tolist()]) for j in range(c)
        ]
        return mean, groups

    def merge(self, frames: Tensor) -> tuple[Tensor, list[Tensor], list[tuple[int, int, int]]]:
        """PruneVid's merge of one video ``frames [T, P, C]``.

        Returns the tokens ``[K, C]``, each one's members (flat input indices, the
        representative first) and the window layout ``(static, dynamic, frames)``.
        """
        t, p, _ = frames.shape
        dev = frames.device
        clusters = max(1, int(t * self.temporal_ratio))  # official: int(T r_t), 0 raises
        label = dpc_knn(frames.mean(1), clusters, self.k, self.noise)
        windows = run_lengths(refine_runs(label.tolist()))
        flat = torch.arange(t * p, device=dev).view(t, p)
        out, members, layout, start = [], [], [], 0
        for w in windows:
            cur = frames[start : start + w]  # [W, P, C]
            unit = F.normalize(cur[None], p=2, dim=-1)
            sim = torch.einsum("bwlc,btlc->bwtl", unit, unit)
            sim = (sim.sum(dim=-2) - 1).sum(dim=-2)[0] / (w * (w - 1))  # [P]; NaN alone
            static = sim > self.tau
            pos = static.nonzero()[:, 0]
            tok, mem = self._group(cur[:, pos].mean(0), [flat[start : start + w, j] for j in pos])
            out.append(tok)
            members += mem
            dyn_pos = (~static).nonzero()[:, 0]
            dynamic = 0
            for f in range(w):
                tok, mem = self._group(
                    cur[f, dyn_pos], [flat[start + f, j : j + 1] for j in dyn_pos]
                )
                out.append(tok)
                members += mem
                dynamic += tok.shape[0]
            layout.append((out[-w - 1].shape[0], dynamic, w))
            start += w
        return torch.cat(out), members, layout

    def _one(self, x: Tensor, size: Tensor, prefix: int, layouts: list, i: int) -> Reduction:
        n, c, p = x.shape[1], x.shape[2], self.frame_tokens
        t = (n - prefix) // p
        if t < 2:
            layouts[i] = None
            return identity(x, size)
        tok, members, layouts[i] = self.merge(x[0, prefix : prefix + t * p].view(t, p, c))
        dev, k = x.device, tok.shape[0]
        tail = torch.arange(prefix + t * p, n, device=dev)
        head = torch.arange(prefix, device=dev)
        rep = torch.stack([m[0] for m in members]) + prefix if members else head[:0]
        index = torch.cat([head, rep, tail])
        out = torch.cat([x[0, :prefix], tok.to(x.dtype), x[0, prefix + t * p :]])
        assign = torch.full((n,), -1, dtype=torch.long, device=dev)
        assign[head], assign[tail] = (
            head,
            torch.arange(prefix + k, prefix + k + len(tail), device=dev),
        )
        for j, m in enumerate(members):
            assign[m + prefix] = prefix + j
        new_size = torch.zeros(index.shape[0], 1, dtype=size.dtype, device=dev)
        new_size.index_add_(0, assign, size[0])
        return Reduction(out[None], new_size[None], index[None], assign[None])

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, _ = x.shape
        p = self.frame_tokens
        if p == 0 or (n - signals.prefix) // p < 2:
            return identity(x, signals.size)
        if b == 0:
            return empty_batch(x, signals.size, self.budget(n, signals.prefix)[0])
        present = signals.present
        if present is None:
            present = torch.ones(b, n, dtype=torch.bool, device=x.device)
        layouts: list = [None] * b

        def reduce_one(i: int, tokens: Tensor) -> Reduction:
            sub = x[i : i + 1, tokens]
            return self._one(sub, signals.size[i : i + 1, tokens], signals.prefix, layouts, i)

        out = each_present_sample(x, signals.size, present, reduce_one)
        signals.state[LAYOUT] = layouts
        return out


def window_keep(score: Tensor, layout: list[tuple[int, int, int]], alpha: float) -> Tensor:
    """``process_attention``: kept merged tokens (sorted) of one video, ``score [K]``."""
    keep, start = [], 0
    for static, dynamic, w in layout:
        s = score[start : start + static]
        keep.append(start + s.topk(int(static * alpha)).indices)
        d = score[start + static : start + static + dynamic].view(w, -1)
        top = d.topk(int(d.shape[1] * alpha), dim=1).indices
        keep.append(
            (
                start + static + top + d.shape[1] * torch.arange(w, device=score.device)[:, None]
            ).flatten()
        )
        start += static + dynamic
    return torch.cat(keep).sort().values


class PruneVidLLM(LLMReducer):
    """PruneVid's in-LLM step: keep ``alpha`` of each window's static and per-frame tokens.

    Reads ``state["prunevid.layout"]`` (written by ``PruneVid``); a sample without a
    layout keeps every image token. Attach after the paper's layer 10.
    """

    catalog_id = "prunevid"
    kind = "pruning"
    needs = frozenset({"attn"})

    def __init__(self, alpha: float = 0.4):
        super().__init__()
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    @classmethod
    def paper_placement(cls, num_layers: int, **kwargs) -> dict[int, PruneVidLLM]:
        return {min(10, num_layers - 1): cls(**kwargs)}

    def image_budget(self, n_image: int) -> tuple[int, int]:
        return 0, n_image

    def forward(self, h: Tensor, signals: LLMSignals) -> Reduction:
        start, length = signals.image_start, signals.image_len
        end = start + length
        layouts = signals.state.get(LAYOUT) or [None] * h.shape[0]
        with torch.no_grad():
            text = signals.valid[:, end:]  # [B, T]
            attn = signals.attn[:, :, end:, start:end].float().amax(1)  # [B, T, Nv]
            score = attn.masked_fill(~text[..., None], 0).amax(1)  # [B, Nv]
        keeps = []
        for i, layout in enumerate(layouts):
            real = sum(s + d for s, d, _ in layout) if layout else length
            kept = window_keep(score[i], layout, self.alpha) if layout else torch.arange(length)
            keeps.append((kept.to(h.device), real))
        width = max(len(k) for k, _ in keeps)
        rows = []
        for kept, real in keeps:
            spare = torch.arange(real, length, device=h.device)[: width - len(kept)]
            if len(kept) + len(spare) < width:
                raise ValueError("PruneVidLLM: a sample has too few empty image slots to pad with")
            rows.append(torch.cat([kept, spare]))
        return keep_image_tokens(h, None, start, length, torch.stack(rows))
