"""Learnable VTM: learnable video token merging.

Paper: "Video Token Merging for Long-form Video Understanding",
https://arxiv.org/abs/2410.23782
Official code: none released (the catalog lists no repository).

Algorithm (Sec. 3, learnable VTM):
1. After a block's attention, a saliency head scores every token; within each window
   of ``L`` consecutive frames the ``1/gamma`` most salient tokens form the target set
   T, the rest the source set S (the partition factor ``gamma``).
2. Each source token is matched to its most similar target (cosine of the attention
   keys, as in ToMe); the ``R = ratio * |S|`` best-matched sources are merged into
   their targets by (size-weighted) average pooling, the other sources stay.
3. Training only: an auxiliary path runs saliency-guided attention (attention whose
   keys are reweighted by the saliency, ``softmax(q k^T / sqrt(d) + log s)``), is
   merged with the same plan and added to the main path, so the saliency head,
   which the hard top-k cannot train, gets a gradient.

Deviations from the paper (there is no official code; what we read were summaries
of the paper and its figure and table captions, not the full method section):
- Host mapping: a video is one frame-major sequence after a protected prefix, as in
  ``reference/inti.py``; ``frame_tokens`` (patches per frame) and ``window_frames``
  (the paper's ``L``) set the merging windows, and trailing tokens that do not fill
  a window pass through. With either set to 0 the whole sequence is one window (an
  image ViT). The paper's VTM blocks also restrict attention to these windows and
  halve the channel width; here the host's global attention is kept and only the
  merging is windowed. The step runs at the ``"mid"`` hook (after attention, before
  the MLP), where the paper's Fig. 2(c) places the VTM layer.
- The saliency head is a linear layer with a sigmoid on the attention output, and the
  targets are the top-``|T|`` tokens by saliency in training and inference alike:
  our reading; the exact head and whether training samples the targets could not be
  checked.
- The auxiliary path reuses the host's attention maps and values (the host's output
  projection is not reachable, so it has its own ``aux_proj``); since merging is
  linear, adding the two merged paths equals merging their sum, which is what we do.
  Prefix tokens get no auxiliary term, so they stay unchanged in training too.
  ``needs`` therefore includes ``attn`` and ``values``, which inference does not use.
- Average pooling is size-weighted (ToMe's ``merge_wavg``), so it equals the plain
  mean while all sizes are 1; sizes add up. ToMe's ``bipartite_soft_matching`` fixes
  the alternating A/B split, so the saliency partition has its own matching here.
- Training recipe, classifier and the paper's multi-stage (L1, L2, L3) schedule are
  left out; prefix tokens never take part in merging.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, empty_batch, gather_tokens, identity
from reference.registry import register


def saliency_guided_attention(attn: Tensor, saliency: Tensor) -> Tensor:
    """Reweight attention ``[B, H, N, N]`` by key saliency ``[B, N]`` and renormalise.

    Equals ``softmax(q k^T / sqrt(d) + log s)``: the auxiliary path's attention.
    """
    w = attn * saliency[:, None, None, :].to(attn.dtype)  # [B, H, N, N]
    return w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def plan_windows(
    saliency: Tensor, metric: Tensor, num_targets: int, r: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Saliency partition and matching inside each window.

    Args:
        saliency: ``[B, W, L]`` scores of the tokens of ``W`` windows of ``L`` tokens.
        metric: ``[B, W, L, D]`` features compared by cosine similarity (keys).
        num_targets: ``|T|``, targets per window (the most salient tokens).
        r: sources merged per window, at most ``L - num_targets``.

    Returns ``src [B, W, r]`` (merged sources), ``dst [B, W, r]`` (their targets) and
    ``targets [B, W, |T|]``, all indices within the window.
    """
    with torch.no_grad():
        targets = saliency.topk(num_targets, dim=-1).indices  # [B, W, T]
        is_target = torch.zeros_like(saliency, dtype=torch.bool).scatter_(-1, targets, True)
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True)
        sim = m @ m.transpose(-1, -2)  # [B, W, L, L]
        # Only targets receive, and targets are never merged away (Sec. 3).
        sim = sim.masked_fill(~is_target[..., None, :], -torch.inf)
        sim = sim.masked_fill(is_target[..., :, None], -torch.inf)
        node_max, node_idx = sim.max(dim=-1)  # [B, W, L]
        src = node_max.argsort(dim=-1, descending=True)[..., :r]
        dst = node_idx.gather(-1, src)
    return src, dst, targets


def merge_into(x: Tensor, size: Tensor, src: Tensor, dst: Tensor) -> Reduction:
    """Merge tokens ``src [B, R]`` of ``x [B, N, C]`` into ``dst [B, R]`` by size-weighted
    average; every other token stays, in its original order."""
    b, n, c = x.shape
    k = n - src.shape[1]
    dev = x.device
    merged = torch.zeros(b, n, dtype=torch.uint8, device=dev).scatter_(1, src, 1)
    keep = merged.argsort(dim=1, stable=True)[:, :k]  # [B, K] survivors, in order
    slot = torch.full((b, n), -1, dtype=torch.long, device=dev)
    slot.scatter_(1, keep, torch.arange(k, device=dev).expand(b, k))
    assign = slot.scatter(1, src, slot.gather(1, dst))  # [B, N]
    out_size = size.new_zeros(b, k, 1).scatter_add(1, assign[..., None], size)
    total = x.new_zeros(b, k, c).scatter_add(1, assign[..., None].expand(-1, -1, c), x * size)
    # Tokens nothing merged into are returned exactly (x * s / s may round).
    untouched = gather_tokens(size, keep) == out_size  # [B, K, 1]
    out = torch.where(untouched, gather_tokens(x, keep), total / out_size)
    return Reduction(x=out, size=out_size, index=keep, assign=assign)


@register
class LearnableVTM(TokenReducer):
    """Saliency-guided video token merging inside windows of consecutive frames.

    Args:
        dim: token width ``C``.
        gamma: partition factor; ``1/gamma`` of each window's tokens are targets.
        ratio: merged sources per window as a fraction of ``|S|`` (the paper's best:
            ``R = 0.8 |S|``); 0 turns the step off.
        frame_tokens: patch tokens per frame ``P`` (0: no frame structure).
        window_frames: frames per merging window ``L`` (0: the whole sequence).
    """

    catalog_id = "learnable_vtm"
    basis = "secondary summaries of the paper text (no official code)"
    kind = "merging"
    needs = frozenset({"keys", "attn", "values"})
    where = "mid"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"dim": 32, "ratio": 0.0},
        "some": {"dim": 32, "gamma": 2, "ratio": 0.8, "frame_tokens": 4, "window_frames": 2},
    }

    def __init__(
        self,
        dim: int = 768,
        gamma: int = 2,
        ratio: float = 0.8,
        frame_tokens: int = 0,
        window_frames: int = 0,
    ):
        super().__init__()
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        if frame_tokens < 0:
            raise ValueError(f"frame_tokens must be >= 0, got {frame_tokens}")
        if window_frames < 0:
            raise ValueError(f"window_frames must be >= 0, got {window_frames}")
        self.gamma, self.ratio = gamma, ratio
        self.frame_tokens, self.window_frames = frame_tokens, window_frames
        self.saliency = nn.Linear(dim, 1)  # saliency head of the main path
        self.aux_proj = nn.Linear(dim, dim)  # output projection of the auxiliary path

    def _plan(self, n: int, prefix: int) -> tuple[int, int, int, int]:
        """Windows ``W``, tokens per window ``L``, targets ``|T|`` and merges ``R`` per window."""
        if self.frame_tokens > 0 and self.window_frames > 0:
            length = self.frame_tokens * self.window_frames
        else:
            length = n - prefix
        windows = (n - prefix) // length if length > 0 else 0
        targets = max(1, length // self.gamma)
        r = max(0, min(int(self.ratio * (length - targets)), length - targets))
        return windows, length, targets, r

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        windows, _, _, r = self._plan(n, prefix)
        return n - windows * r, n - windows * r

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, c = x.shape
        prefix = signals.prefix
        windows, length, num_targets, r = self._plan(n, prefix)
        if windows == 0 or r == 0:
            return identity(x, signals.size)
        if b == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(n, prefix)[0])
        saliency = self.saliency(x)[..., 0].sigmoid()  # [B, N]
        if self.training:
            # Auxiliary path (training only): saliency-guided attention; prefix keys
            # keep weight 1 and prefix rows get no update, so the prefix stays as is.
            s = torch.cat([saliency.new_ones(b, prefix), saliency[:, prefix:]], dim=1)
            aux = saliency_guided_attention(signals.attn, s) @ signals.values  # [B, H, N, D]
            aux = self.aux_proj(aux.transpose(1, 2).reshape(b, n, c).to(x.dtype))
            x = x + torch.cat([aux.new_zeros(b, prefix, c), aux[:, prefix:]], dim=1)
        video = slice(prefix, prefix + windows * length)  # 'b (w l) -> b w l'
        src, dst, _ = plan_windows(
            saliency.detach()[:, video].reshape(b, windows, length),
            signals.keys[:, video].reshape(b, windows, length, -1),
            num_targets,
            r,
        )
        offset = prefix + length * torch.arange(windows, device=x.device)[:, None]  # [W, 1]
        return merge_into(x, signals.size, (src + offset).flatten(1), (dst + offset).flatten(1))
