"""SparseVLM: text-guided visual token sparsification inside the language model.

Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference" (ICML 2025), https://arxiv.org/abs/2410.04417
Official code: https://github.com/Gumpest/SparseVLMs (read at commit b9619e6, the
release at the ICML acceptance, before SparseVLM+): ``llava/model/language_model/
modelling_sparse_llama.py`` (``LlamaDynamicvitModel.forward``: rater selection and the
merge-and-cluster block), ``score.py`` (``attn_postprocess_topk``, the per-layer counts
``sparse_token_dict``) and ``utils.py`` (``cluster_and_merge``).

Algorithm (Sec. 3):
1. Raters: from the input embeddings, each text token after the image gets the
   softmax (over text tokens) of its similarity to every image token, averaged over
   the image tokens; the text tokens above the mean are the raters.
2. At a sparse layer, each image token is scored by the attention the raters pay it
   (that layer's probabilities, averaged over heads and raters); the top ``keep``
   stay (in order), at most all but one.
3. Recycling: of the dropped tokens, the ``int(0.3 d) + 1`` best-scored are
   clustered (DPC-KNN, ``int(m / 10) + 1`` centres) and each cluster's mean is added
   after the kept image tokens. Positions are renumbered ``0..n-1``.
4. LLaVA-1.5 (32 layers): sparse layers 2, 6, 15 with 66/30/17 (64 tokens), 303/110/36
   (128) or 300/200/110 (192) image tokens kept (``SparseVLM.schedule``).

Deviations from the official code:
- One instance per sparse layer (``schedule``), hooked after that layer with its own
  attention, as the official code prunes the layer's output. The raters are chosen
  once, by the first instance, and kept in ``state["sparsevlm.raters"]``. They come
  from the input embeddings when the caller passes them as ``state["sparsevlm.embeds"]``
  ``[B, N, C]`` (the host does not expose them); without them, from the hidden states
  the first instance sees (not the official input).
- Per sample, with right padding: each sample's raters, softmax and means run over its
  own valid text tokens; the official code is batch-1 (``mask[0][indices]``).
- The per-layer count is the ICML release's fixed ``keep``. The first release
  (commit 91fb6d9) instead kept ``int(rank(P) * 13.5)`` tokens, ``P`` the rater-image
  attention block, as the paper's rank-based adaptation describes; that rule is not
  implemented (per-sample counts would need padding inside the language model).
- ``cluster_and_merge`` breaks density ties (every pair of mutual nearest neighbours
  when ``k = 2``) with ``1e-6 * torch.rand``; so does ``noise=True`` (the default,
  drawn from the global generator, so a result depends on its state and its batch);
  ``noise=False`` leaves ties to the strict comparison, deterministic and per sample.
- A recycled token's ``index`` is its cluster centre, so ``index`` is not increasing
  after a recycling step and a replayed prefill (``replay=``) cannot rebuild it; the
  ``"some"`` test configuration therefore recycles nothing.
- Nothing is learned: the official training path (``policy`` masks) is left out.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction
from reference.hosts.llava import LLMReducer, LLMSignals
from reference.registry import register

RATERS = "sparsevlm.raters"
EMBEDS = "sparsevlm.embeds"
# The official per-layer image-token counts for LLaVA-1.5 (score.py, sparse_token_dict).
LAYERS = (2, 6, 15)
COUNTS = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}


def select_raters(v: Tensor, t: Tensor, valid: Tensor) -> Tensor:
    """The text tokens relevant to the image (the raters).

    Args:
        v: ``[B, Nv, C]`` image token embeddings.
        t: ``[B, T, C]`` text token embeddings (everything after the image).
        valid: ``[B, T]`` False for padding.

    Returns:
        ``[B, T]`` bool: the raters.
    """
    with torch.no_grad():
        sim = (v.float() @ t.float().transpose(1, 2)).masked_fill(~valid[:, None], -torch.inf)
        rel = sim.softmax(2).mean(1)  # [B, T]
        mean = (rel * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
    return (rel > mean) & valid


def dpc_knn_merge(x: Tensor, k: int, noise: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Cluster ``x [B, M, C]`` into ``k`` groups by density peaks (DPC-KNN) and average them.

    ``noise``: add ``1e-6 * torch.rand`` (the global generator) to the densities, as the
    official code does to break ties (two mutual nearest neighbours have equal density).

    Returns the cluster means ``[B, k, C]`` (sums over ``count + 1e-6``, as the official
    code), each token's cluster ``[B, M]`` and the centres ``[B, k]`` (by decreasing score).
    """
    with torch.no_grad():
        dist = (x[:, :, None] - x[:, None]).norm(dim=-1) / x.shape[-1] ** 0.5  # [B, M, M]
        knn = dist.topk(k, dim=-1, largest=False).values
        density = (-(knn**2).mean(-1)).exp()  # [B, M]
        if noise:
            density = density + torch.rand(density.shape, device=x.device, dtype=x.dtype) * 1e-6
        denser = density[:, None, :] > density[:, :, None]  # [B, i, j]: j denser than i
        far = dist.flatten(1).max(-1).values[:, None, None]
        delta = torch.where(denser, dist, far).min(-1).values  # distance to a denser token
        centres = (delta * density).topk(k, dim=-1).indices  # [B, k]
        cluster = dist.gather(1, centres[..., None].expand(-1, -1, dist.shape[2])).argmin(1)
        cluster.scatter_(1, centres, torch.arange(k, device=x.device).expand_as(centres))
    count = torch.zeros(x.shape[0], k, device=x.device).scatter_add_(
        1, cluster, torch.ones_like(cluster, dtype=torch.float)
    )
    weight = (1 / (count + 1e-6)).gather(1, cluster).to(x.dtype)  # [B, M]
    merged = x.new_zeros(x.shape[0], k, x.shape[2]).scatter_add_(
        1, cluster[..., None].expand_as(x), x * weight[..., None]
    )
    return merged, cluster, centres


@register
class SparseVLM(LLMReducer):
    """Keep the ``keep`` image tokens the raters attend to most after this layer.

    Args:
        keep: image tokens kept (the official per-layer count); None turns it off.
        recycle: recycle dropped tokens into cluster means (official).
        recycle_ratio: fraction of the dropped tokens clustered (official 0.3, plus one).
        cluster_ratio: clusters per recycled token (official 1/10, plus one).
        renumber: renumber positions after the drop (official).
        noise: the official random tie-break of cluster densities.
    """

    catalog_id = "sparsevlm"
    kind = "pruning"
    needs = frozenset({"attn"})
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"keep": None},
        "some": {"keep": 8, "recycle": False},
    }

    def __init__(
        self,
        keep: int | None = 66,
        recycle: bool = True,
        recycle_ratio: float = 0.3,
        cluster_ratio: float = 0.1,
        renumber: bool = True,
        noise: bool = True,
    ):
        super().__init__()
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"keep must be an int >= 0 or None, got {keep!r}")
        if not 0 <= recycle_ratio < 1:
            raise ValueError(f"recycle_ratio must be in [0, 1), got {recycle_ratio}")
        if not 0 <= cluster_ratio < 1:
            raise ValueError(f"cluster_ratio must be in [0, 1), got {cluster_ratio}")
        self.keep, self.recycle, self.renumber = keep, recycle, renumber
        self.recycle_ratio, self.cluster_ratio, self.noise = recycle_ratio, cluster_ratio, noise

    @classmethod
    def schedule(cls, retained: int = 64, layers=LAYERS, **kwargs) -> dict[int, SparseVLM]:
        """The official sparse layers and counts for ``retained`` in 64, 128, 192."""
        if retained not in COUNTS:
            raise ValueError(f"retained must be one of {sorted(COUNTS)}, got {retained}")
        return {i: cls(keep=k, **kwargs) for i, k in zip(layers, COUNTS[retained], strict=True)}

    @classmethod
    def paper_placement(cls, num_layers: int, retained: int = 64, **kwargs) -> dict:
        """LLaVA-1.5's layers 2, 6, 15 of 32, scaled to ``num_layers`` (distinct layers)."""
        layers = sorted({min(num_layers - 1, round(i * num_layers / 32)) for i in LAYERS})
        if len(layers) < len(LAYERS):
            return {}
        return cls.schedule(retained, tuple(layers), **kwargs)

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        # One sparse layer (the official first, layer 2) whose kept and recycled tokens
        # add up to ``keep``.
        layer = min(2, cfg.layers - 1)
        for k in range(min(keep, n_image - 1), -1, -1):
            method = cls(keep=k)
            if method.image_budget(n_image)[0] <= keep:
                return {"llm": {layer: method}}
        return {"llm": {layer: cls(keep=0, recycle=False)}}

    def counts(self, n: int) -> tuple[int, int, int]:
        """Kept, recycled and cluster counts for ``n`` image tokens."""
        if self.keep is None or n == 0:
            return n, 0, 0
        kept = min(self.keep, n - 1)
        dropped = n - kept
        if not self.recycle:
            return kept, 0, 0
        m = int(dropped * self.recycle_ratio) + 1
        return kept, m, int(m * self.cluster_ratio + 1e-9) + 1

    def image_budget(self, n_image: int) -> tuple[int, int]:
        kept, _, clusters = self.counts(n_image)
        return kept + clusters, kept + clusters

    def raters(self, h: Tensor, signals: LLMSignals) -> Tensor:
        """``[B, T]`` raters over the text after the image (chosen once per prefill)."""
        state, start, length = signals.state, signals.image_start, signals.image_len
        if RATERS not in state:
            src = state.get(EMBEDS, h)
            text = src.shape[1] - (h.shape[1] - start - length)  # first text token of src
            valid = signals.valid[:, start + length :]
            state[RATERS] = select_raters(src[:, start:text], src[:, text:], valid)
        return state[RATERS]

    def forward(self, h: Tensor, signals: LLMSignals) -> Reduction:
        b, n, c = h.shape
        start, length = signals.image_start, signals.image_len
        kept_n, m, k = self.counts(length)
        if kept_n == length:
            ar = torch.arange(n, device=h.device).expand(b, n)
            return Reduction(h, h.new_ones(b, n, 1), ar, ar)
        end = start + length
        with torch.no_grad():
            raters = self.raters(h, signals).float()  # [B, T]
            attn = signals.attn.float().mean(1)[:, end:, start:end]  # [B, T, Nv]
            score = (attn * raters[..., None]).sum(1) / raters.sum(1, keepdim=True).clamp(min=1)
            top = score.topk(kept_n, dim=1).indices.sort(1).values  # [B, kept]
        ar = torch.arange(n, device=h.device)
        before, after = ar[:start].expand(b, -1), ar[end:].expand(b, -1)
        parts, sizes = [start + top], [h.new_ones(b, kept_n, 1)]
        merged, members, cluster, centres = None, None, None, None
        if m:
            dropped = torch.ones(b, length, dtype=torch.bool, device=h.device)
            dropped.scatter_(1, top, False)
            with torch.no_grad():
                members = score.masked_fill(~dropped, -torch.inf).topk(m, dim=1).indices
            x = h.gather(1, (start + members)[..., None].expand(-1, -1, c))  # [B, m, C]
            merged, cluster, centres = dpc_knn_merge(x, k, self.noise)
            parts.append(start + members.gather(1, centres))
            sizes.append(torch.zeros(b, k, 1, dtype=h.dtype, device=h.device))
            sizes[-1].scatter_add_(1, cluster[..., None], h.new_ones(b, m, 1))
        index = torch.cat([before, *parts, after], 1)  # [B, N']
        out = h.gather(1, index[..., None].expand(-1, -1, c))
        if merged is not None:
            out[:, start + kept_n : start + kept_n + k] = merged
        size = torch.cat([h.new_ones(b, start, 1), *sizes, h.new_ones(b, n - end, 1)], 1)
        assign = torch.full((b, n), -1, dtype=torch.long, device=h.device)
        slots = torch.arange(index.shape[1], device=h.device)
        keep_idx = torch.cat([before, start + top, after], 1)
        keep_slots = torch.cat([slots[: start + kept_n], slots[start + kept_n + k :]])
        assign.scatter_(1, keep_idx, keep_slots.expand(b, -1))
        if merged is not None:
            assign.scatter_(1, start + members, start + kept_n + cluster)
        return Reduction(x=out, size=size, index=index, assign=assign)
