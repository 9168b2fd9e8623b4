"""FiCoCo: Filter, Correlate, Compress.

Paper: "Filter, Correlate, Compress: Training-Free Token Reduction for MLLM
Acceleration", https://arxiv.org/abs/2411.17686
Official code: https://github.com/kawhiiiileo/FiCoCo
(``llava/model/multimodal_encoder/FiCoCo_V.py`` and ``clip_encoder.py`` for
FiCoCo-V; ``llava/model/language_model/FiCoCo_L.py`` and ``llava_llama.py`` for
FiCoCo-L)

Algorithm (training-free; one step discards ``r`` tokens):
1. Filter: score every patch's redundancy from the pre-softmax attention logits
   averaged over heads, ``(1 - beta) * |patch->patch| - beta * |CLS->patch|``
   (row means / the CLS row, each L2-normalised over the patches, beta = 0.35);
   a local penalty raises the most redundant token of every 2x2 window; the
   ``r`` most redundant tokens are discarded.
2. Correlate: each discarded token ``i`` picks the kept tokens ``j`` it
   correlates with most (attention ``A_ij`` above the row's 0.998 quantile, a
   token-adaptive count) and normalises those correlations into weights.
3. Compress: each kept token becomes the size-weighted mean of itself and the
   weighted discarded tokens that chose it, so it keeps its own content.
FiCoCo-L (``FiCoCoL``, unregistered) does the same on the image tokens inside
the LLM, with the text-to-image attention in the redundancy and the
correlation (``g = a = 0.6``) and a plain weighted sum as compression.

Deviations from the official code:
- Host mapping: ``FiCoCo`` (FiCoCo-V, the registered class) is a vision-stage
  ``TokenReducer`` at a ``"mid"`` hook; the official code runs ``r = 42`` at
  every CLIP layer after layer 11, the LLaVA host has one vision hook (the ViT
  host can stack it). ``FiCoCoL`` is an ``LLMReducer`` for ``host.apply(llm=...)``.
- Scores: the official code (at commit 8995e93) averages the pre-softmax logits
  over heads *and over the batch* (one plan for all samples); here every sample
  gets its own plan from its head-mean logits, and the correlation weights are
  the softmax of those logits, as in the official ``Correlate``. The logits are
  read from ``signals.attn_logits`` ``[B, H, N, N]``, which both hosts in this
  package compute for it (``needs`` names them); given only probabilities (a
  caller's own ``Signals``), the head mean of ``signals.attn`` is used, which
  is not the official score (on random 8-head maps with 576 patches only 10-20%
  of the discarded set agrees). ``redundancy`` on head-mean logits reproduces
  the official ``Filter`` ranking (``tests/reference/fixtures/ficoco.json``).
- The local penalty runs only when the non-prefix tokens form a square grid
  (the first step); the official code carries a global 576-slot score buffer
  across layers to guess the layout after earlier reductions.
- Correlate: targets are restricted to kept, non-prefix tokens and the
  quantile is taken per row over those candidates (at least the best one is
  always a target); the official code takes one ``k`` for the whole batch (the
  largest count above the quantile of the full row), may pick CLS, the token
  itself or other discarded tokens as targets, and scatters with indices of the
  un-reduced sequence into the reordered kept tokens. Kept tokens stay in their
  original order (the official code reorders them by score, CLS last).
- ``assign`` maps a discarded token to its strongest target (it may feed more).
- FiCoCo-L: the host's attention is causal, so image rows never see the text;
  the text relevance of image token ``i`` is the mean attention the valid
  instruction tokens after the image pay to it (the official code reads the
  image-row / text-column logits before the causal mask), and the indirect
  correlation is ``sum_t A_ti A_tj``. Its merged values cannot be replayed by
  the host's ``replay`` (which follows ``index`` only), so it is not registered
  and is tested in ``tests/reference/test_ficoco.py``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, gather_tokens, identity
from reference.hosts.llava import LLMReducer, LLMSignals
from reference.registry import register


def local_penalty(redundancy: Tensor, window: int = 2) -> Tensor:
    """Raise the most redundant token of every ``window x window`` cell of a square grid.

    ``redundancy [B, M]`` with ``M = n * n``; positive values double, negative ones
    halve (the official code halves/doubles ``-redundancy``). Partial cells at the
    border are left alone, as in the official code.
    """
    b, m = redundancy.shape
    n = math.isqrt(m)
    cells = n // window
    if n * n != m or cells == 0:
        return redundancy
    grid = redundancy.view(b, n, n)[:, : cells * window, : cells * window]
    # 'b (h wy) (w wx) -> b h w (wy wx)'
    grid = grid.reshape(b, cells, window, cells, window).permute(0, 1, 3, 2, 4).flatten(3)
    best = grid.argmax(-1)  # [B, h, w]
    rows = torch.arange(cells, device=redundancy.device)
    pos = (rows[:, None] * window + best // window) * n + rows[None, :] * window + best % window
    picked = redundancy.gather(1, pos.flatten(1))  # [B, cells^2]
    boosted = torch.where(picked > 0, picked * 2, picked / 2)
    return redundancy.scatter(1, pos.flatten(1), boosted)


def correlate(corr: Tensor, quantile: float) -> Tensor:
    """Token-adaptive targets: ``corr [B, R, K]`` (NaN = not a candidate) -> weights.

    Each row keeps the candidates at or above its ``quantile`` and normalises them
    to sum to one (Correlate step); the other entries are 0.
    """
    q = torch.nanquantile(corr, quantile, dim=-1, keepdim=True)  # [B, R, 1]
    w = torch.where(corr >= q, corr, 0.0).nan_to_num(0.0).clamp(min=0)
    top = corr.nan_to_num(-torch.inf).argmax(-1, keepdim=True)
    w = w.scatter(-1, top, w.gather(-1, top).clamp(min=1e-12))  # a target even if all are 0
    return w / w.sum(-1, keepdim=True)


def compress(
    x: Tensor, size: Tensor | None, src: Tensor, dst: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Fold discarded tokens ``src [B, R]`` into kept tokens ``dst [B, K]``.

    ``weights [B, R, K]`` rows sum to one. With ``size`` (FiCoCo-V) a kept token
    becomes the size-weighted mean of itself and its share of the discarded
    tokens, and sizes add up; without (FiCoCo-L) the shares are simply added.
    """
    xs, xd = gather_tokens(x, src).float(), gather_tokens(x, dst).float()  # [B, R|K, C]
    if size is None:
        return (xd + weights.transpose(1, 2) @ xs).to(x.dtype), None
    ss, sd = gather_tokens(size, src).float(), gather_tokens(size, dst).float()
    share = weights.transpose(1, 2) @ ss  # [B, K, 1] size each kept token absorbs
    out = (sd * xd + weights.transpose(1, 2) @ (ss * xs)) / (sd + share)
    return out.to(x.dtype), (sd + share).to(size.dtype)


def redundancy(logits: Tensor, prefix: int, beta: float = 0.35) -> Tensor:
    """Filter score ``[B, M]`` of the patches from head-mean attention ``logits [B, N, N]``.

    Higher is more redundant: ``(1 - beta) * patch->patches - beta * CLS->patch``,
    each term L2-normalised over the patches, then the 2x2 local penalty. The
    official code passes pre-softmax logits; without a prefix token the CLS term is 0.
    """
    if prefix:
        cls = F.normalize(logits[:, 0, prefix:], dim=-1)  # CLS -> patch
    else:
        cls = logits.new_zeros(logits.shape[0], logits.shape[1])
    p2p = F.normalize(logits[:, prefix:, prefix:].mean(-1), dim=-1)  # patch -> patches
    return local_penalty((1 - beta) * p2p - beta * cls)


def _plan(redundancy: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Discard the ``r`` most redundant of ``redundancy [B, M]``; kept indices sorted."""
    order = redundancy.argsort(dim=1, descending=True)
    return order[:, :r], order[:, r:].sort(dim=1).values


@register
class FiCoCo(TokenReducer):
    """FiCoCo-V: discard ``r`` redundant patches and recycle them into correlated ones.

    Args:
        r: tokens discarded per step (the official 42 per layer).
        beta: weight of the CLS attention in the redundancy score.
        quantile: correlation quantile above which a kept token is a target.
    """

    catalog_id = "ficoco"
    kind = "merging"
    needs = frozenset({"attn", "attn_logits"})
    where = "mid"
    test_configs: ClassVar[dict[str, dict]] = {"zero": {"r": 0}, "some": {"r": 6}}

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        # One FiCoCo-V step at the host's vision hook removing all but ``keep`` patches.
        return {"vision": cls(r=n_image - keep)}

    def __init__(self, r: int = 42, beta: float = 0.35, quantile: float = 0.998):
        super().__init__()
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        self.r, self.beta, self.quantile = r, beta, quantile

    def _r(self, n: int, prefix: int) -> int:
        return max(0, min(self.r, n - prefix - 1))  # at least one target stays

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        return n - self._r(n, prefix), n - self._r(n, prefix)

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, _ = x.shape
        prefix, r = signals.prefix, self._r(n, signals.prefix)
        if r == 0:
            return identity(x, signals.size)
        if b == 0:  # an empty batch: nothing to score; the budget's shapes
            return empty_batch(x, signals.size, self.budget(n, prefix)[0])
        with torch.no_grad():
            logits = getattr(signals, "attn_logits", None)
            if logits is not None:  # the official scores: head-mean pre-softmax logits
                score = logits.float().mean(1)  # [B, N, N]
                attn = score.softmax(-1)
            else:  # hosts that expose only probabilities (see the module docstring)
                attn = score = signals.attn.float().mean(1)
            src, dst = _plan(redundancy(score, prefix, self.beta), r)  # [B, r], [B, M - r]
            src, dst = src + prefix, dst + prefix
            rows = attn.gather(1, src[..., None].expand(-1, -1, n))  # [B, r, N]
            weights = correlate(rows.gather(2, dst[:, None].expand(-1, r, -1)), self.quantile)
        merged, size = compress(x, signals.size, src, dst, weights.to(torch.float32))

        pre = torch.arange(prefix, device=x.device).expand(b, prefix)
        index = torch.cat([pre, dst], 1)  # [B, N']
        slots = torch.arange(index.shape[1], device=x.device).expand(b, -1)
        assign = torch.full((b, n), -1, dtype=torch.long, device=x.device)
        assign = assign.scatter(1, index, slots)
        assign = assign.scatter(1, src, prefix + weights.argmax(-1))  # strongest target
        out_x = torch.cat([x[:, :prefix], merged], 1)
        out_size = torch.cat([signals.size[:, :prefix], size], 1)
        return Reduction(x=out_x, size=out_size, index=index, assign=assign)


class FiCoCoL(LLMReducer):
    """FiCoCo-L: discard ``r`` redundant image tokens inside the LLM and add them to kept ones.

    Attach with ``host.apply(llm={layer: FiCoCoL(r)})`` (the official code starts
    after decoder layer 4 with ``r = 14``). Not registered: see the module docstring.
    """

    catalog_id = "ficoco"
    kind = "merging"
    needs = frozenset({"attn"})

    def __init__(self, r: int = 14, g: float = 0.6, a: float = 0.6, quantile: float = 0.998):
        super().__init__()
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        self.r, self.g, self.a, self.quantile = r, g, a, quantile

    def _r(self, n_image: int) -> int:
        return max(0, min(self.r, n_image - 1))

    def image_budget(self, n_image: int) -> tuple[int, int]:
        return n_image - self._r(n_image), n_image - self._r(n_image)

    def forward(self, h: Tensor, signals: LLMSignals) -> Reduction:
        b, n, _ = h.shape
        s, length = signals.image_start, signals.image_len
        r = self._r(length)
        if r == 0:
            return identity(h, torch.ones(b, n, 1, dtype=h.dtype, device=h.device))
        img = slice(s, s + length)
        with torch.no_grad():
            attn = signals.attn.float().mean(1)  # [B, N, N]
            text = signals.valid.clone()
            text[:, : s + length] = False  # the instruction after the image
            a_tv = attn[:, :, img] * text[..., None]  # [B, N, Nv] text rows only
            relevance = a_tv.sum(1) / text.sum(1, keepdim=True).clamp(min=1)  # [B, Nv]
            a_vv = attn[:, img, img]  # [B, Nv, Nv]
            score = self.g * a_vv.sum(-1) - (1 - self.g) * relevance
            src, dst = _plan(score, r)  # into the image span
            corr = self.a * a_vv + (1 - self.a) * a_tv.transpose(1, 2) @ a_tv  # [B, Nv, Nv]
            rows = corr.gather(1, src[..., None].expand(-1, -1, length))
            weights = correlate(rows.gather(2, dst[:, None].expand(-1, r, -1)), self.quantile)
        merged, _ = compress(h, None, src + s, dst + s, weights)

        dev = h.device
        before, after = torch.arange(s, device=dev), torch.arange(s + length, n, device=dev)
        index = torch.cat([before.expand(b, -1), dst + s, after.expand(b, -1)], 1)
        out = torch.cat([h[:, :s], merged, h[:, s + length :]], 1)
        assign = torch.full((b, n), -1, dtype=torch.long, device=dev)
        assign = assign.scatter(1, index, torch.arange(index.shape[1], device=dev).expand(b, -1))
        assign = assign.scatter(1, src + s, s + weights.argmax(-1))
        return Reduction(
            x=out,
            size=torch.ones(b, out.shape[1], 1, dtype=h.dtype, device=dev),
            index=index,
            assign=assign,
        )
