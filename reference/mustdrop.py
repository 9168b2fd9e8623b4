"""MustDrop: drop vision tokens at vision encoding, prefilling and decoding.

Paper: "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large
Language Model", https://arxiv.org/abs/2411.10803
Official code: https://github.com/liuting20/MustDrop (``multimodal_encoder/
local_merge.py`` and ``clip_encoder.py``; ``language_model/modelling_sparse_llama.py``)

Algorithm (Sec. 3):
1. Vision encoding (``MustDropVision``): in every ``w x w`` window of the patch
   grid, average the pairwise cosine similarity of its tokens; merge the most
   similar windows into their last token (size-weighted mean), and mark the
   tokens the CLS attends to most as a key set that later stages never drop.
2. Prefilling (``MustDrop``, registered): at chosen decoder layers, the text
   tokens' attention to the image (head mean) gives a global score (sum over text
   tokens) and an individual score (max over text tokens); an image token is
   dropped when both fall below their thresholds, unless it is a key token.
3. Decoding (``MustDropDecoding``): the KV cache of every layer from the first
   pruning layer on is cut down to the image tokens that survived the last one.

Deviations from the official code:
- The vision stage runs at the host's one vision hook (the feature layer): the
  official code merges after CLIP layer 0 and picks the key set from the CLS row
  of layer 23, after merging. Here a merged token's key score is the summed CLS
  attention of the tokens it absorbed. As in the official code, the windows with
  similarity >= ``threshold`` (0.8) are merged, or a fixed ``merge`` count if
  given. The official count is the minimum over the batch (``batch_min=True``), so
  one image changes another's result; by default each image merges its own count
  and the batch is padded to the largest with empty slots (``Reduction.mask`` 0,
  masked by the hosts). At batch 1 the two agree; the merged tokens come first, most
  similar window first, then the rest in spatial order (``order="similarity"``);
  ``order="spatial"`` keeps all tokens in spatial order, a merged one at its
  window's last position.
- Prefilling: with ``ratio=None`` (the default, as in the official code) the
  thresholds decide (defaults 1e-3 and 1e-3, the README's 192-token setting);
  samples are filled up to the batch's largest count by the ordering below (the
  official code reads batch item 0 only). With ``ratio`` set, every sample keeps
  a fixed count: key tokens first, then the highest ``max(global / (total *
  global_thr), individual / individual_thr)``, the ordering under which the
  official threshold rule keeps exactly the tokens scoring >= 1. Padding text
  tokens are not queries.
- The key set travels in ``state["mustdrop.key"]`` (``[B, Nv]`` bool over the
  image span); without a vision stage it is empty.
- Decoding: the host has no decoding hook, so ``MustDropDecoding.apply`` rewrites
  the cache that ``prefill`` returned (a new dict; the input is left intact).
- Positions: ``renumber=True`` (the default, as in the official code) has the
  host renumber positions ``0..n-1`` after each drop, and every layer decodes at
  its own (compressed) cache length, as the official decoding does;
  ``renumber=False`` keeps the host's convention (kept tokens keep their
  original positions; decoding continues after the full prompt).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, identity
from reference.hosts.llava import LlavaHost, LLMReducer, LLMSignals
from reference.ops import each_present_sample, keep_image_tokens, sample_signals
from reference.registry import register

KEY = "mustdrop.key"


# -- vision encoding ------------------------------------------------------------
def window_similarity(patches: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Mean pairwise cosine similarity inside each ``window x window`` window.

    Args:
        patches: ``[B, G*G, C]`` patch tokens of a square grid.
    Returns:
        ``[B, W]`` similarity per window and ``[W, window^2]`` its patch indices.
    """
    n = patches.shape[1]
    side = math.isqrt(n)
    if side * side != n or side % window:
        raise ValueError(f"{n} patches do not tile into {window}x{window} windows")
    grid = torch.arange(n, device=patches.device).view(side, side)
    cells = grid.unfold(0, window, window).unfold(1, window, window).reshape(-1, window**2)
    feats = F.normalize(patches[:, cells].float(), dim=-1)  # [B, W, k, C]
    sims = feats @ feats.transpose(-1, -2)  # [B, W, k, k]
    k = window**2
    off_diag = sims.sum((-1, -2)) - sims.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off_diag / (k * (k - 1)), cells


def local_merge(
    x: Tensor,
    size: Tensor,
    prefix: int,
    window: int,
    merge: int | None = None,
    threshold: float = 0.8,
    order: str = "similarity",
) -> Reduction:
    """Merge the most self-similar windows of ``x [B, N, C]`` into their last token.

    Args:
        merge: windows merged per sample; None: those with similarity >= ``threshold``,
            their count the minimum over the batch (official ``conditional_pooling``).
        order: ``"similarity"``: merged tokens first, most similar window first, then the
            others in spatial order (official); ``"spatial"``: all in spatial order.
    """
    b, n, c = x.shape
    patches = x[:, prefix:]
    n_p, k = n - prefix, window**2
    with torch.no_grad():
        sim, cells = window_similarity(patches, window)  # [B, W], [W, k]
        if merge is None:
            merge = int((sim >= threshold).sum(1).min())
        chosen = sim.topk(merge, dim=1).indices  # [B, r], most similar first
        members = cells[chosen]  # [B, r, k]; the last member is the destination
        target = torch.arange(n_p, device=x.device).repeat(b, 1)  # [B, Np]
        target.scatter_(1, members.flatten(1), members[..., -1:].expand(-1, -1, k).flatten(1))
        survives = target == torch.arange(n_p, device=x.device)  # [B, Np]
        m = n_p - merge * (k - 1)
        if order == "spatial":  # a stable sort puts the True entries first, in order
            kept = survives.long().sort(dim=1, descending=True, stable=True).indices[:, :m]
        else:
            dst = members[..., -1]  # [B, r]
            alone = survives.scatter(1, dst, False)
            rest = alone.long().sort(dim=1, descending=True, stable=True).indices[:, : m - merge]
            kept = torch.cat([dst, rest], 1)  # [B, M]
        slot = torch.full_like(target, -1).scatter_(
            1, kept, torch.arange(m, device=x.device).expand(b, -1)
        )
        assign_p = slot.gather(1, target) + prefix  # [B, Np]
    # Size-weighted mean of each group (official ``merge_wavg``).
    p_size = size[:, prefix:]
    idx = (assign_p - prefix).unsqueeze(-1)
    tot = torch.zeros(b, m, 1, dtype=size.dtype, device=x.device).scatter_add(1, idx, p_size)
    acc = torch.zeros(b, m, c, dtype=x.dtype, device=x.device)
    acc = acc.scatter_add(1, idx.expand(-1, -1, c), patches * p_size.to(x.dtype))
    pre = torch.arange(prefix, device=x.device).expand(b, -1)
    return Reduction(
        x=torch.cat([x[:, :prefix], acc / tot.to(x.dtype)], 1),
        size=torch.cat([size[:, :prefix], tot], 1),
        index=torch.cat([pre, kept + prefix], 1),
        assign=torch.cat([pre, assign_p], 1),
    )


class MustDropVision(TokenReducer):
    """Vision-encoding stage (unregistered: the catalog entry is the prefill stage).

    Writes the key set ``state["mustdrop.key"]`` ``[B, N' - prefix]`` for ``MustDrop``.
    """

    catalog_id = "mustdrop"
    kind = "merging"
    needs = frozenset({"cls_attn"})
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"merge": 0, "key_rate": 0.0},
        "some": {"window": 2, "merge": 2, "key_rate": 0.25},
    }

    def __init__(
        self,
        window: int = 3,
        merge: int | None = None,
        key_rate: float = 0.08,
        threshold: float = 0.8,
        order: str = "similarity",
        batch_min: bool = False,
    ):
        """``merge``: windows merged per image; None: each image merges its windows with
        similarity >= ``threshold`` (``batch_min=True``: the batch's smallest such count
        for every image, as the official code does)."""
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if merge is not None and merge < 0:
            raise ValueError(f"merge must be >= 0 or None, got {merge}")
        if not 0 <= key_rate <= 1:
            raise ValueError(f"key_rate must be in [0, 1], got {key_rate}")
        if order not in ("similarity", "spatial"):
            raise ValueError(f"order must be 'similarity' or 'spatial', got {order!r}")
        self.window, self.merge, self.key_rate = window, merge, key_rate
        self.threshold, self.order, self.batch_min = threshold, order, batch_min

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        if self.merge is None:  # anywhere from every window merged to none
            return n - (n - prefix) // self.window**2 * (self.window**2 - 1), n
        out = n - self.merge * (self.window**2 - 1)
        return out, out

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        p = signals.prefix
        if self.merge is None and not self.batch_min and x.shape[0] > 1:
            return self._each_image(x, signals)
        red = (
            identity(x, signals.size)
            if self.merge == 0
            else local_merge(
                x, signals.size, p, self.window, self.merge, self.threshold, self.order
            )
        )
        with torch.no_grad():  # key set: CLS attention (head mean), summed per merged group
            cls = signals.cls_attn.float().mean(1)[:, p:]  # [B, Np]
            m = red.num_tokens - p
            score = torch.zeros(x.shape[0], m, device=x.device)
            score = score.scatter_add(1, red.assign[:, p:] - p, cls)
            top = score.topk(math.ceil(self.key_rate * m), dim=1).indices
            signals.state[KEY] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)
        return red

    def _each_image(self, x: Tensor, signals: Signals) -> Reduction:
        """Every image merges its own windows over the threshold; the batch is padded to
        the largest count with empty slots, whose key-set entries are False."""
        keys: list[Tensor] = []

        def one(i: int, tokens: Tensor) -> Reduction:
            alone = sample_signals(signals, i, tokens)
            out = self(x[i : i + 1, tokens], alone)
            keys.append(alone.state[KEY][0])
            return out

        red = each_present_sample(
            x, signals.size, torch.ones_like(x[..., 0], dtype=torch.bool), one
        )
        key = torch.zeros(x.shape[0], red.num_tokens - signals.prefix, dtype=torch.bool)
        for i, k in enumerate(keys):
            key[i, : k.shape[0]] = k
        signals.state[KEY] = key.to(x.device)
        return red


# -- prefilling -------------------------------------------------------------------
def dual_attention_scores(
    attn: Tensor, valid: Tensor, start: int, length: int, global_thr: float, individual_thr: float
) -> Tensor:
    """``[B, Nv]`` importance; the official filter keeps exactly the tokens with >= 1.

    Args:
        attn: ``[B, H, N, N]`` attention probabilities of the layer.
        valid: ``[B, N]`` False for padding (padding rows are not queries).
    """
    end = start + length
    a = attn[:, :, end:, start:end].float().mean(1)  # [B, T, Nv] text -> image
    a = a * valid[:, end:, None]
    glob = a.sum(1)  # global attention, summed over text tokens
    indiv = a.amax(1)  # individual attention, the strongest single text token
    total = glob.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.maximum(glob / (total * global_thr), indiv / individual_thr)


@register
class MustDrop(LLMReducer):
    """Prefill stage: dual-attention filter with a protected key set.

    ``ratio``: None (official): the thresholds decide (adaptive, filled to the
    batch's largest count); a float: fraction of the image tokens dropped at this
    layer (fixed count).
    """

    catalog_id = "mustdrop"
    kind = "pruning"
    needs = frozenset({"attn"})
    test_configs: ClassVar[dict[str, dict]] = {"zero": {"ratio": 0.0}, "some": {"ratio": 0.5}}

    def __init__(
        self,
        ratio: float | None = None,
        global_thr: float = 1e-3,
        individual_thr: float = 1e-3,
        renumber: bool = True,
    ):
        super().__init__()
        self.renumber = renumber
        if ratio is not None and not 0 <= ratio < 1:
            raise ValueError(f"ratio must be in [0, 1) or None, got {ratio}")
        if global_thr <= 0 or individual_thr <= 0:
            raise ValueError("thresholds must be positive")
        self.ratio, self.global_thr, self.individual_thr = ratio, global_thr, individual_thr

    def image_budget(self, n_image: int) -> tuple[int, int]:
        if self.ratio is None:
            return 0, n_image
        kept = n_image - round(n_image * self.ratio)
        return kept, kept

    def forward(self, h: Tensor, signals: LLMSignals) -> Reduction:
        start, length = signals.image_start, signals.image_len
        with torch.no_grad():
            imp = dual_attention_scores(
                signals.attn, signals.valid, start, length, self.global_thr, self.individual_thr
            )
            key = signals.state.get(KEY)
            if key is None or key.shape != imp.shape:
                key = torch.zeros_like(imp, dtype=torch.bool)
            rank = torch.where(key, imp + imp.amax(1, keepdim=True) + 1, imp)  # key tokens first
            if self.ratio is None:
                keep = int(((imp >= 1) | key).sum(1).max())
            else:
                keep = self.image_budget(length)[0]
            idx = rank.topk(keep, dim=1).indices.sort(1).values  # [B, K]
            signals.state[KEY] = key.gather(1, idx)  # follow the key set into the pruned span
        return keep_image_tokens(h, None, start, length, idx)


# -- decoding ---------------------------------------------------------------------
def compress_cache(
    cache: dict, trace: list[Tensor], layers: list[int], renumber: bool = False
) -> dict:
    """Cut every layer's KV cache from ``layers[0]`` on to the final token set.

    Args:
        cache: what ``LlavaHost.prefill`` returned (not modified).
        trace: the ``index`` of each prefill reduction, in order (``last_trace``).
        layers: the decoder layers those reductions ran after, ascending.
        renumber: the prefill renumbered positions; each layer then decodes at its
            cache's length (valid tokens), as the official code does.
    """
    composed = list(trace)  # composed[s]: sequence entering layer layers[s] -> final set
    for s in range(len(trace) - 2, -1, -1):
        composed[s] = trace[s].gather(1, composed[s + 1])
    out = []
    for i, lc in enumerate(cache["layers"]):
        stage = sum(p < i for p in layers)  # reductions applied before layer i's input
        if not layers or i < layers[0] or stage == len(trace):
            out.append(dict(lc))
            continue
        sel = composed[stage]  # [B, N_final]
        kv = sel[:, None, :, None]
        out.append(
            {
                "k": lc["k"].gather(2, kv.expand(-1, lc["k"].shape[1], -1, lc["k"].shape[3])),
                "v": lc["v"].gather(2, kv.expand(-1, lc["v"].shape[1], -1, lc["v"].shape[3])),
                "valid": lc["valid"].gather(1, sel),
                "pos_shift": lc.get("pos_shift", 0),
            }
        )
    if renumber:
        for lc in out:
            lc["pos_shift"] = cache["next_pos"] - lc["valid"].sum(1)
    return {**cache, "layers": out}


class MustDropDecoding:
    """Decoding stage (unregistered): the output-aware KV cache of the official code."""

    def apply(self, host: LlavaHost, cache: dict) -> dict:
        """The compressed cache for ``host``'s last ``prefill`` (its reducers and trace)."""
        layers = sorted(int(k) for k in host.llm_reducers)
        renumber = host.renumber
        if renumber is None:
            renumber = any(r.renumber for r in host.llm_by_layer.values())
        return compress_cache(cache, host.last_trace, layers, renumber)
