"""TPS: joint Token Pruning and Squeezing.

Paper: "Joint Token Pruning and Squeezing Towards More Aggressive Compression of Vision
Transformers", https://arxiv.org/abs/2304.10716
Official code: https://github.com/megvii-research/TPS-CVPR2023
(``torch_codebase/models/dynamic_vit.py``: ``TPSModule``, ``PredictorLG``, ``DynamicVit``)

Algorithm (Sec. 3):
1. Pruning: score the image tokens and split them into a reserved set (top-k) and a
   pruned set. dTPS (inter-block) scores with DynamicViT's learned predictor and
   Gumbel-softmax decisions; eTPS (intra-block) with the CLS attention, as EViT.
2. Matching: every pruned token picks its host, the reserved token of highest cosine
   similarity (unidirectional nearest neighbour).
3. Fusing: a host becomes the softmax-weighted mean of itself (weight ``exp(1)``, its
   self-similarity) and its pruned tokens (weight ``exp(cos / temperature)``).

Deviations from the official code:
- Hooks: dTPS runs at ``"pre"`` (before the block, where the official ``DynamicVit``
  prunes at blocks 3, 6, 9); eTPS at ``"mid"`` after the attention, as EViT. The eTPS
  variant is not in the official repository; it follows the paper's description.
- ``keep_rate`` is, as in the official ``keep_ratio_list``, a fraction of the initial
  image-token count: a step keeps ``int(N0 * keep_rate)`` (``0.7 ** s`` at stage ``s``
  keeps 137/96/67 of 196, where a per-stage 0.7 would keep 137/95/66). ``N0`` is the
  count that entered the first TPS step of this forward (``signals.state``), as the
  official ``init_n`` (image tokens before the first block). ``budget()`` sees only
  the current count, so it is exact for a first step. ``relative=True`` makes
  ``keep_rate`` a fraction of the tokens entering this step. At least one token is
  kept (a host).
- Training (dTPS): the token count stays fixed and the hard Gumbel decisions are
  returned in ``Reduction.mask`` and carried to the next TPS step in ``signals.state``.
  The official model also masks the attention of every later block with them
  (``softmax_with_policy``), and so does the ViT host.
  The training losses (DynamicViT's keep-ratio, distillation and KL terms) are left
  out; ``keep_rate`` only acts at inference (in training it enters through that loss).
- The matching scores all ``M x M`` image-token pairs and masks the non-hosts (one
  function serves both paths); the official inference path scores pruned x reserved.
- A pruned token has exactly one host (``argmax``); the official ``== max`` test
  would give it two hosts on an exact tie.
- The matching runs under ``torch.no_grad()``; the fusion weights keep their gradient,
  as in the official code. Kept tokens come back in spatial order (the official code
  orders them by score); all ``prefix`` tokens are protected (official: CLS only).
- Sizes: a host's ``size`` becomes the sum of what it absorbed (the official code has
  no sizes); the fusion itself is not size-weighted, as in the official code.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, gather_tokens, identity, keep_tokens
from reference.registry import register


def num_kept(m: int, keep_rate: float, n0: int | None = None) -> int:
    """Reserved image tokens of ``m``: ``int(keep_rate * n0)``, ``n0`` the initial count
    (default ``m``); at least one, so every pruned token has a host."""
    return min(m, max(1, int(keep_rate * (m if n0 is None else n0))))


def squeeze(
    x: Tensor, host_ok: Tensor, pruned: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Fuse every pruned token of ``x [B, M, C]`` into its most similar host.

    Args:
        x: ``[B, M, C]`` image tokens.
        host_ok: ``[B, M]`` bool, tokens of the reserved set (possible hosts).
        pruned: ``[B, M]`` weight of each token as a pruned token: 1 to squeeze it,
            0 to leave it out (a straight-through Gumbel decision keeps its gradient).
        temperature: divides the cosine similarity in the fusion weights.

    Returns:
        ``x' [B, M, C]`` where each host is the weighted mean of itself and the tokens
        squeezed into it (other tokens are unchanged), and ``host [B, M]`` the index of
        each token's host.
    """
    with torch.no_grad():  # matching: nearest reserved token by cosine similarity
        unit = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
        sim = unit @ unit.transpose(1, 2)  # [B, M, M]
        host = sim.masked_fill(~host_ok[:, None, :], -torch.inf).argmax(dim=-1)  # [B, M]
        has_host = host_ok.any(dim=1, keepdim=True)  # [B, 1]
    # Fusing: the weights carry gradient into x, as in the official code.
    unit = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
    cos = (unit * gather_tokens(unit, host)).sum(-1)  # [B, M]
    weight = (cos / temperature).exp() * pruned.to(x.dtype) * has_host  # [B, M]
    # x_h' = (e x_h + sum_{j -> h} exp(c_jh) x_j) / (e + sum_{j -> h} exp(c_jh))
    num = math.e * x + torch.zeros_like(x).scatter_add(
        1, host[..., None].expand_as(x), weight[..., None] * x
    )
    den = math.e + torch.zeros_like(weight).scatter_add(1, host, weight)  # [B, M]
    return num / den[..., None], host


def tps_reduce(
    x: Tensor,
    size: Tensor,
    score: Tensor,
    prefix: int,
    keep_rate: float,
    temperature: float = 1.0,
    n0: int | None = None,
) -> Reduction:
    """Keep the top ``int(keep_rate * n0)`` image tokens of ``x [B, N, C]`` by ``score
    [B, N-prefix]`` (``n0`` the initial image-token count, default ``N - prefix``) and
    squeeze the rest into their hosts (inference path of dTPS, both paths of eTPS)."""
    b, n, _ = x.shape
    m = n - prefix
    k = num_kept(m, keep_rate, n0)
    if k >= m:
        return identity(x, size)
    with torch.no_grad():
        top = score.topk(k, dim=1).indices  # [B, k]
        host_ok = torch.zeros(b, m, dtype=torch.bool, device=x.device).scatter(1, top, True)
    squeezed, host = squeeze(x[:, prefix:], host_ok, ~host_ok, temperature)
    absorbed = torch.zeros_like(size[:, prefix:]).scatter_add(
        1, host[..., None], size[:, prefix:] * (~host_ok)[..., None]
    )
    full = torch.cat([x[:, :prefix], squeezed], dim=1)
    full_size = size + F.pad(absorbed, (0, 0, prefix, 0))
    out = keep_tokens(full, full_size, prefix, top + prefix)
    # A pruned token goes where its host went.
    host_slot = out.assign[:, prefix:].gather(1, host)  # [B, M]
    out.assign[:, prefix:] = torch.where(host_ok, out.assign[:, prefix:], host_slot)
    return out


class Predictor(nn.Module):
    """DynamicViT's score head (``PredictorLG``): log-probabilities of (keep, prune)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2),
        )  # fmt: skip

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        """``x [B, M, C]``, ``policy [B, M, 1]`` (live tokens) -> ``[B, M, 2]``."""
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        # Global feature: mean of the live tokens' second half, broadcast to every token.
        glob = (x[..., half:] * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True)
        x = torch.cat([x[..., :half], glob.expand(-1, x.shape[1], -1)], dim=-1)
        return self.out_conv(x).log_softmax(dim=-1)


@register
class TPS(TokenReducer):
    """dTPS (learned predictor, ``"pre"`` hook) or eTPS (CLS attention, ``"mid"`` hook)."""

    catalog_id = "tps"
    kind = "pruning"
    needs = frozenset()
    where = "pre"

    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"dim": 32, "keep_rate": 1.0},
        "some": {"dim": 32, "keep_rate": 0.5},
    }

    def __init__(
        self,
        dim: int = 768,
        keep_rate: float = 1.0,
        variant: str = "dtps",
        temperature: float = 1.0,
        relative: bool = False,
    ):
        super().__init__()
        if variant not in ("dtps", "etps"):
            raise ValueError(f"variant must be 'dtps' or 'etps', got {variant!r}")
        if not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        self.variant, self.keep_rate, self.temperature = variant, keep_rate, temperature
        self.relative = relative
        self.predictor = Predictor(dim) if variant == "dtps" else None
        if variant == "etps":
            self.where, self.needs = "mid", frozenset({"cls_attn"})

    @classmethod
    def paper_setting(cls, depth: int, dim: int) -> tuple[dict[int, dict], bool]:
        # The official default (``dtps_deit_small_patch16_224``): ``keep_ratio=0.7`` at
        # blocks 3, 6 and 9 of 12, i.e. 0.7 ** s of the initial count at stage s. The
        # benchmark runs eTPS, the paper's parameter-free variant, so that timings do not
        # depend on an untrained predictor.
        step = depth // 4
        return {step * i: {"keep_rate": 0.7**i, "variant": "etps"} for i in (1, 2, 3)}, False

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        if self.training and self.variant == "dtps":
            return n, n
        out = prefix + num_kept(n - prefix, self.keep_rate)
        return out, out

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        prefix = signals.prefix
        n0 = signals.state.setdefault("tps_init_n", x.shape[1] - prefix)
        n0 = None if self.relative else n0
        if self.variant == "etps":
            with torch.no_grad():
                score = signals.cls_attn[:, :, prefix:].mean(dim=1)  # [B, N - prefix]
            return tps_reduce(x, signals.size, score, prefix, self.keep_rate, self.temperature, n0)
        if not self.training:
            live = x.new_ones(x.shape[0], x.shape[1] - prefix, 1)
            logp = self.predictor(x[:, prefix:], live)  # [B, M, 2]
            return tps_reduce(
                x, signals.size, logp[..., 0], prefix, self.keep_rate, self.temperature, n0
            )
        return self._train_step(x, signals)

    def _train_step(self, x: Tensor, signals: Signals) -> Reduction:
        """Fixed token count: hard Gumbel decisions, pruned tokens squeezed but kept."""
        b, n, _ = x.shape
        prefix = signals.prefix
        prev = signals.state.get("tps_decision")  # [B, M] decision of the last TPS step
        if prev is None or prev.shape != (b, n - prefix):
            prev = x.new_ones(b, n - prefix)
        logp = self.predictor(x[:, prefix:], prev[..., None])  # [B, M, 2]
        keep = F.gumbel_softmax(logp, hard=True)[..., 0] * prev  # [B, M], straight-through
        pruned = (1 - keep) * prev  # pruned now; earlier pruned tokens stay out
        squeezed, _ = squeeze(x[:, prefix:], keep.detach() > 0, pruned, self.temperature)
        signals.state["tps_decision"] = keep
        ar = torch.arange(n, device=x.device).expand(b, n)
        return Reduction(
            x=torch.cat([x[:, :prefix], squeezed], dim=1),
            size=signals.size,
            index=ar,
            assign=ar,
            mask=torch.cat([keep.new_ones(b, prefix), keep], dim=1),
        )
