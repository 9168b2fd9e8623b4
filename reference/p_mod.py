"""p-MoD: mixture-of-depths decoder layers for vision tokens, with progressive ratio decay.

Paper: "p-MoD: Building Mixture-of-Depths MLLMs via Progressive Ratio Decay",
https://arxiv.org/abs/2412.04449
Official code: https://github.com/MCG-NJU/p-MoD, ``llava/model/language_model/
pmod_llava_llama.py`` (``ModLayer``, ``TokenRouter``, ``shifted_cos_with_ratio``,
``PmodLlavaLlamaModel.build_mod_layers``).

Algorithm, in each MoD layer ``l`` (training and inference alike):
1. A router (``Linear(hidden, 1)``) scores every token; only image tokens are candidates. The
   scores are normalised (TanhNorm, ``w = 0.2 tanh(s) + 1``) and the top ``trunc(ratio_l *
   N_image)`` image tokens go through the layer with every text token; the others skip it.
2. Symmetric token reweighting (STRing): a routed image token leaves the layer as
   ``h + attn + w * mlp``, a skipped one as ``w * h``; text tokens as usual.
3. Progressive ratio decay (PRD): ``ratio_l = cos(l pi / (L - 1)) / 2 + 0.5`` (shifted
   cosine), layers with ``ratio_l <= 0.85`` are MoD layers, and ``ratio_l >= 0.15``. At
   Vicuna-7B (32 layers) that is layers 8-31, 24 routers, 98,328 parameters (as the official).
The layer's KV cache holds the tokens that went through it, at their own positions; decoded
tokens go through every layer (the official inference routes the prompt only).

Host mapping: a ``SequenceMethod`` of the LLaVA host (``apply(sequence=PMoD.for_host(cfg))``)
with ``route``/``merge`` at its layers. Weights: the official keys
``model.layers.{l}.router.router.{weight,bias}`` are ``routers.{l}.router.*`` here
(``load_official``).

Deviations from the official code:
- The decay's ``L - 1`` is the host's depth less one; the official hard-codes 31 (Vicuna-7B's
  32 layers, where both agree).
- Candidates are the image run's slots, all of them (``mod_target_token_type="vision_all"``);
  empty slots a vision reducer padded a sample with count as candidates (the official has no
  padded image). The top-k runs over the whole normalised row, as the official (non-candidates
  at ``norm(-inf)``), so ties break alike; every sample must then keep the same count.
- Batches: the official trains with packed right-padded rows (flash attention) and infers at
  batch 1; here padding goes through the layer masked, so a sample gets what it gets alone.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.hosts.llava import Layout, LlavaConfig, SequenceMethod
from reference.registry import register


def shifted_cos(mean: float, layer: int, num_layers: int) -> float:
    return math.cos(layer * math.pi / (num_layers - 1)) / 2 + mean


def shifted_linear(mean: float, layer: int, num_layers: int) -> float:
    return -layer / (num_layers - 1) + 0.5 + mean


DECAY = {"shiftedcos": shifted_cos, "shiftedlinear": shifted_linear}
NORMS = ("softmax", "sigmoid", "tanh", "none")


def prd_schedule(
    num_layers: int,
    router_factor: float = 0.5,
    max_ratio: float = 0.85,
    min_ratio: float = 0.15,
    decay: str = "shiftedcos",
) -> dict[int, float]:
    """The MoD layers and their ratios (``mod_target_layers="{decay}_decay_{max}_{min}"``)."""
    f = DECAY[decay]
    return {
        i: max(f(router_factor, i, num_layers), min_ratio)
        for i in range(num_layers)
        if f(router_factor, i, num_layers) <= max_ratio
    }


def parse_weight_norm(spec: str) -> tuple[str, float, float]:
    """``"tanh_0.2_1"`` -> ``("tanh", 0.2, 1.0)``: ``w = scale * norm(s) + bias``."""
    match = re.fullmatch(r"(\w+?)_(\d+\.\d+|\d+)_(-?\d+\.\d+|-?\d+)", spec)
    kind, scale, bias = (
        (match.group(1), float(match.group(2)), float(match.group(3)))
        if match
        else (spec, 1.0, 1.0)
    )
    if kind not in NORMS:
        raise ValueError(
            f"weight_norm must be one of {NORMS} (optionally _scale_bias), got {spec!r}"
        )
    return kind, scale, bias


class TokenRouter(nn.Module):
    def __init__(self, hidden: int, bias: bool, zero_init: bool):
        super().__init__()
        self.router = nn.Linear(hidden, 1, bias=bias)
        if zero_init:  # the official ``mod_special_init``
            nn.init.zeros_(self.router.weight)
            if bias:
                nn.init.zeros_(self.router.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.router(x).squeeze(-1)  # [B, N]


@register
class PMoD(SequenceMethod):
    """Routers at the PRD layers; image tokens outside the top ratio skip the layer.

    Args:
        hidden: the language model's width.
        num_layers: its depth (for the PRD schedule).
        router_factor, max_ratio, min_ratio, decay: the schedule (official defaults).
        weight_norm: ``"{softmax|sigmoid|tanh|none}_{scale}_{bias}"`` (TanhNorm by default).
        bias: routers with a bias. special_init: routers start at zero (the official).
        ratios: ``{layer: ratio}`` in place of the schedule.
    """

    catalog_id = "p_mod"
    kind = "adaptive-computation"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"hidden": 64, "num_layers": 4, "special_init": False}
    }

    def __init__(
        self,
        hidden: int = 4096,
        num_layers: int = 32,
        router_factor: float = 0.5,
        max_ratio: float = 0.85,
        min_ratio: float = 0.15,
        decay: str = "shiftedcos",
        weight_norm: str = "tanh_0.2_1",
        bias: bool = True,
        special_init: bool = True,
        ratios: dict[int, float] | None = None,
    ):
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"num_layers must be >= 2, got {num_layers}")
        if decay not in DECAY:
            raise ValueError(f"decay must be one of {tuple(DECAY)}, got {decay!r}")
        if not 0 < max_ratio <= 1:
            raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio}")
        if not 0 <= min_ratio <= max_ratio:
            raise ValueError(f"min_ratio must be in [0, max_ratio], got {min_ratio}")
        self.norm = parse_weight_norm(weight_norm)
        if ratios is None:
            ratios = prd_schedule(num_layers, router_factor, max_ratio, min_ratio, decay)
        if any(not 0 <= r <= 1 or not 0 <= i < num_layers for i, r in ratios.items()):
            raise ValueError(
                f"ratios must be {{layer < num_layers: ratio in [0, 1]}}, got {ratios}"
            )
        self.ratios = dict(ratios)
        self.routers = nn.ModuleDict(
            {str(i): TokenRouter(hidden, bias, special_init) for i in self.ratios}
        )

    @classmethod
    def for_host(cls, cfg: LlavaConfig, **kwargs) -> PMoD:
        return cls(**{"hidden": cfg.hidden, "num_layers": cfg.layers, **kwargs})

    def weights(self, layout: Layout, h: Tensor) -> tuple[Tensor, Tensor]:
        """The normalised router weights ``[B, N]`` (non-candidates at ``norm(-inf)``) and the
        candidate mask ``[B, N]`` of layer ``layout.layer``."""
        target = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
        target[:, layout.image_start : layout.image_start + layout.image_len] = True
        logits = self.routers[str(layout.layer)](h).masked_fill(~target, -torch.inf)
        kind, scale, bias = self.norm
        if kind == "softmax":
            logits = F.softmax(logits, dim=1)
        elif kind == "sigmoid":
            logits = torch.sigmoid(logits)
        elif kind == "tanh":
            logits = torch.tanh(logits)
        return logits * scale + bias, target

    def route(self, layout: Layout, h: Tensor) -> Tensor | None:
        if layout.layer not in self.ratios:
            return None
        w, target = self.weights(layout, h)
        k = int(layout.image_len * self.ratios[layout.layer])  # trunc, as the official
        kept = ~target  # every text and padding token goes through
        kept = kept.scatter(1, w.topk(k, dim=1, sorted=True).indices, True)
        b, n = kept.shape
        return torch.arange(n, device=h.device).expand(b, n)[kept].view(b, -1)  # [B, K]

    def merge(self, layout: Layout, h: Tensor, index: Tensor, mid: Tensor, mlp: Tensor) -> Tensor:
        w, target = self.weights(layout, h)
        scale = torch.where(target, w, torch.ones_like(w))[..., None]  # STRing on image tokens
        out = h * scale  # a skipped image token: w * h
        routed = mid + scale.gather(1, index[..., None]) * mlp  # [B, K, C]
        return out.scatter(1, index[..., None].expand_as(routed), routed)


def load_official(method: PMoD, state_dict: dict[str, Tensor]) -> None:
    """Load the routers of an official checkpoint (``model.layers.{l}.router.router.*``)."""
    own = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.router\.router\.(weight|bias)", key)
        if match:
            own[f"routers.{match.group(1)}.router.{match.group(2)}"] = value
    method.load_state_dict(own)
