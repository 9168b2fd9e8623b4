"""ATP-LLaVA: adaptive token pruning with learned, instance-wise thresholds between decoder layers.

Paper: "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models" (CVPR 2025),
https://arxiv.org/abs/2412.00447 (project page https://yxxxb.github.io/ATP-LLaVA-page/)
Official code: none released (no repository on the project page or in the catalog entry).

PROVISIONAL: written from the paper's abstract and the project page, the only parts of the
paper that could be read here (the stored copies of the arXiv HTML end after the abstract and
the first lines of the introduction). Everything below the abstract's sentences is a guess.
A third-party course reimplementation (github.com/Sneha421/AI6103-ATP-LLaVA, not the authors')
reads the paper the same way on the scores and masks (self- plus cross-modal attention,
uniformly sampled spatial tokens, sigmoid soft masks joined by max, OR when hard), but
predicts the thresholds from the two mean scores instead of the hidden states.

Algorithm (abstract): an ATP module between two decoder layers scores the image tokens and
computes, from the input instance, the pruning thresholds of that layer, so the kept share
varies per layer and per image-prompt pair. Spatial Augmented Pruning (SAP) prunes with two
scores, token redundancy and spatial modelling. Training uses differentiable (soft) masks and
a budget constraint; inference prunes hard.

Guessed (none of this is in the abstract):
- Redundancy score: the attention an image token receives from the image tokens (self-modal)
  plus the attention it receives from the instruction tokens after the image (cross-modal),
  from this layer's maps, averaged over heads and queries; turned into a within-sample rank in
  ``[0, 1]`` over the image tokens the spatial branch does not keep (spatially kept: rank 1).
- Spatial score: ``1 - |G_k| / n0`` for a token on the coarsest stride-``k`` grid it lies on
  (``strides``, of the original ``sqrt(n0) x sqrt(n0)`` grid; 0 off every grid), so one
  threshold picks a uniform sampling stride.
- Thresholds: ``threshold_mlp`` (Linear 2C -> ``mlp_dim``, GELU, Linear -> 2, sigmoid) on the
  mean image and mean valid-instruction hidden states gives ``(theta_r, theta_s)``; its last
  layer starts at zero weight and bias ``logit(init_thresholds)``, so an untrained module
  prunes like a fixed-ratio one. Soft keep ``m = max(sigmoid((r - theta_r) / tau),
  sigmoid((s - theta_s) / tau))``; hard keep ``m > 0.5``. ``min_keep`` / ``max_keep`` (shares
  of the image tokens; not in the paper, defaults unbounded) clamp the kept count.
- Training (``module.train()``): every token stays and each image token's hidden state is
  scaled by ``m`` (the host has no attention-bias hook, where a soft mask may rather act);
  the mean ``m`` of each ATP layer is appended to ``state["atp_llava.kept"]`` and
  ``budget_loss`` penalises the squared gap of their mean to a target share.
- Batches: the host cannot pad inside the language model, so a batch keeps its largest
  per-sample count and each sample fills up with its next best tokens; batch 1 gives the
  paper's per-instance counts. Placement: after decoder layers 2, 6, 12 and 20 of 32
  (scaled to the decoder depth). Widths: LLaVA-1.5-7B (4096), ``mlp_dim`` 256, ``tau`` 0.1.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.core import Reduction
from reference.hosts.llava import LLMReducer, LLMSignals
from reference.ops import keep_image_tokens
from reference.registry import register

POS = "atp_llava.pos"  # [B, image_len] raster index of each image token on the first grid
SIDE = "atp_llava.side"
KEPT = "atp_llava.kept"  # per ATP layer: [B] mean soft keep (training)


@torch.no_grad()
def redundancy_score(attn: Tensor, start: int, length: int, valid: Tensor) -> Tensor:
    """``[B, Nv]``: attention each image token receives from the image tokens plus the attention
    it receives from the valid instruction tokens after the image (heads and queries averaged)."""
    a = attn.float().mean(1)  # [B, N, N]
    img = slice(start, start + length)
    self_modal = a[:, img, img].mean(1)
    text = valid[:, start + length :].float()  # [B, T]
    cross = (a[:, start + length :, img] * text[..., None]).sum(1)
    return self_modal + cross / text.sum(1, keepdim=True).clamp(min=1)


@torch.no_grad()
def spatial_score(pos: Tensor, side: int, strides: tuple[int, ...]) -> Tensor:
    """``[B, Nv]``: ``1 - |grid_k| / side^2`` for the coarsest stride ``k`` whose grid holds the
    token (raster index ``pos`` on a ``side x side`` grid), 0 off every grid."""
    row, col = pos // side, pos % side
    score = torch.zeros(pos.shape, dtype=torch.float32, device=pos.device)
    for k in sorted(strides):  # coarser strides overwrite finer ones
        on_grid = (row % k == 0) & (col % k == 0)
        score = torch.where(on_grid, 1 - math.ceil(side / k) ** 2 / side**2, score)
    return score


@torch.no_grad()
def rank01(score: Tensor, among: Tensor) -> Tensor:
    """Within-sample rank of ``score [B, N]`` in ``[0, 1]`` over the tokens where ``among``;
    1 elsewhere."""
    s = score.masked_fill(~among, torch.inf)
    order = s.argsort(dim=1, stable=True).argsort(dim=1).float()  # 0 = lowest
    m = among.sum(1, keepdim=True).float()
    return torch.where(among, order / (m - 1).clamp(min=1), torch.ones_like(order))


@register
class ATPLLaVA(LLMReducer):
    """One ATP module: learned instance-wise thresholds on redundancy and spatial scores."""

    catalog_id = "atp_llava"
    kind = "pruning"
    needs = frozenset({"attn"})
    basis = "paper (provisional)"
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"dim": 64, "mlp_dim": 16, "min_keep": 1.0},
        "some": {"dim": 64, "mlp_dim": 16, "strides": (2,), "max_keep": 0.75},
    }

    def __init__(
        self,
        dim: int = 4096,
        mlp_dim: int = 256,
        strides: tuple[int, ...] = (8, 4, 2),
        init_thresholds: tuple[float, float] = (0.7, 0.9),
        tau: float = 0.1,
        min_keep: float = 0.0,
        max_keep: float = 1.0,
    ):
        super().__init__()
        if not 0 <= min_keep <= 1:
            raise ValueError(f"min_keep must be in [0, 1], got {min_keep}")
        if not min_keep <= max_keep <= 1:
            raise ValueError(f"max_keep must be in [min_keep, 1], got {max_keep}")
        if not all(0 < t < 1 for t in init_thresholds) or len(init_thresholds) != 2:
            raise ValueError(f"init_thresholds must be two values in (0, 1), got {init_thresholds}")
        if not strides or min(strides) < 2:
            raise ValueError(f"strides must be integers >= 2, got {strides}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.strides, self.tau = tuple(strides), tau
        self.min_keep, self.max_keep = min_keep, max_keep
        self.threshold_mlp = nn.Sequential(
            nn.Linear(2 * dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, 2)
        )
        nn.init.zeros_(self.threshold_mlp[2].weight)
        with torch.no_grad():
            self.threshold_mlp[2].bias.copy_(torch.logit(torch.tensor(init_thresholds)))

    @classmethod
    def paper_placement(cls, num_layers: int, **kwargs) -> dict[int, ATPLLaVA]:
        # Guessed: after layers 2, 6, 12, 20 of LLaVA-1.5-7B's 32, scaled to the depth.
        layers = sorted({min(num_layers - 2, round(i * num_layers / 32)) for i in (2, 6, 12, 20)})
        return {i: cls(**kwargs) for i in layers if i >= 0}

    def image_budget(self, n_image: int) -> tuple[int, int]:
        low = max(1, math.ceil(self.min_keep * n_image - 1e-9))
        return low, max(low, math.floor(self.max_keep * n_image + 1e-9))

    def thresholds(self, h: Tensor, signals: LLMSignals) -> Tensor:
        """``[B, 2]``: ``(theta_r, theta_s)`` from the mean image and instruction states."""
        start, end = signals.image_start, signals.image_start + signals.image_len
        text = signals.valid[:, end:].to(h.dtype)[..., None]  # [B, T, 1]
        pooled_text = (h[:, end:] * text).sum(1) / text.sum(1).clamp(min=1)
        pooled = torch.cat([h[:, start:end].mean(1), pooled_text], -1)
        return self.threshold_mlp(pooled).float().sigmoid()

    def keep_mask(self, h: Tensor, signals: LLMSignals) -> Tensor:
        """``[B, Nv]`` soft keep weights ``m`` of the image tokens (differentiable in theta)."""
        b, length = h.shape[0], signals.image_len
        state = signals.state
        pos = state.get(POS)
        if pos is None or pos.shape != (b, length):  # the first ATP module of this forward
            side = math.isqrt(length)
            if side * side != length:
                raise ValueError(f"image tokens must form a square grid, got {length}")
            pos, state[SIDE] = torch.arange(length, device=h.device).expand(b, -1), side
        state[POS] = pos
        spatial = spatial_score(pos, state[SIDE], self.strides)
        theta = self.thresholds(h, signals)
        sp_kept = spatial > theta[:, 1:].detach()
        red = redundancy_score(signals.attn, signals.image_start, length, signals.valid)
        rank = rank01(red, ~sp_kept)
        m_red = ((rank - theta[:, :1]) / self.tau).sigmoid()
        m_sp = ((spatial - theta[:, 1:]) / self.tau).sigmoid()
        return torch.maximum(m_red, m_sp)

    def forward(self, h: Tensor, signals: LLMSignals) -> Reduction:
        start, length = signals.image_start, signals.image_len
        m = self.keep_mask(h, signals)  # [B, Nv]
        if self.training:  # soft masking: every token stays, scaled by its keep weight
            signals.state.setdefault(KEPT, []).append(m.mean(1))
            ones = torch.ones(h.shape[:2], dtype=m.dtype, device=h.device)
            scale = torch.cat([ones[:, :start], m, ones[:, start + length :]], 1)
            every = torch.arange(length, device=h.device).expand(h.shape[0], -1)
            return keep_image_tokens(h * scale[..., None].to(h.dtype), None, start, length, every)
        with torch.no_grad():
            low, high = self.image_budget(length)
            count = int((m > 0.5).sum(1).clamp(low, high).max())
            keep = m.topk(count, dim=1, sorted=False).indices.sort(1).values
            signals.state[POS] = signals.state[POS].gather(1, keep)
        return keep_image_tokens(h, None, start, length, keep)


def budget_loss(state: dict, target: float) -> Tensor:
    """Squared gap between the mean kept share of the ATP layers of one training forward
    (``state["atp_llava.kept"]``) and ``target``, averaged over the batch."""
    kept = torch.stack(state[KEPT]).mean(0)  # [B]
    return ((kept - target) ** 2).mean()


__all__ = ["ATPLLaVA", "budget_loss", "rank01", "redundancy_score", "spatial_score"]
