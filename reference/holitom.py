"""HoliTom: holistic token merging for video LLMs, outside and inside the language model.

Paper: "HoliTom: Holistic Token Merging for Fast Video Large Language Models"
(NeurIPS 2025), https://arxiv.org/abs/2505.21334
Official code: https://github.com/cokeshao/HoliTom (read at commit e9b2972):
``holitom/llava_arch.py`` (``LlavaMetaForCausalLM_holitom``: ``select_static_windows``,
``get_static_dynamic_features``, ``holitom``, ``merge_tokens_by_attention_density``,
``merge_tokens_by_density``, ``merge_tokens_by_clustering``, ``cluster_dpc_knn``, and the
video block of ``prepare_inputs_labels_for_multimodal``) and ``holitom/modeling_qwen2.py``
(``Qwen2Model_holitom.forward``, the merge at layer ``HOLITOM_k``); settings from
``scripts/eval_ov-7b_holitom.sh`` (LLaVA-OneVision-7B, retain 0.10, T 0.65, k 18, r 0.5)
and the code's defaults (beta 0.6, D 0, K 7).

Algorithm (Sec. 3):
1. Temporal: a dynamic programme splits the frames into windows maximising the tokens
   saved, ``|{l: cos(f_t[l], f_t+1[l]) > tau for all t in the window}| * (W - 1)``.
2. In a window, those static positions become their mean over the window; the
   retain ratio is raised to ``r / (remaining fraction)``.
3. Spatial: each frame keeps its ``ceil(n r')`` dynamic tokens, the ``(1 - D)`` share
   with the highest attention and the rest as DPC-kNN centres; the static tokens
   become ``round(n r')`` DPC-kNN centres. Every other token joins its nearest centre,
   which becomes ``beta * centre + (1 - beta) * mean(members)``.
4. Inner (``HoliTomLLM``): entering layer ``k``, keep the ``round(L (1 - r))`` image
   tokens the last token attends to most in layer ``k - 1``; every other one is averaged
   into its most similar kept token, ``(kept + other) / 2``, one after another.

Deviations from the official code:
- Host mapping (DyCoke's convention): a video is one frame-major sequence of ``T x P``
  tokens after the protected prefix, ``frame_tokens = P``; tokens that do not fill a
  frame are carried through; ``where = "pre"``. The official merge runs on the projected,
  2x2-pooled features; the saliency is ``state["holitom.saliency"]`` ``[B, T P]`` when
  given, else the head-mean CLS attention row (officially the vision tower's attention,
  pooled like the tokens). A window emits its static tokens, then each frame's
  (``mm_newline_position`` "one_token"; the "grid" layout's per-row newlines are left out).
- With ``D > 0`` the official code raises (a position mask broadcast to ``[W, n, n]``);
  here it keeps the contextual centres, which the fixture checks with that line fixed.
- Per sample (the official code is batch-1): counts depend on the video, so samples are
  padded with empty slots (``Reduction.mask`` 0). DPC-kNN's ``1e-6 * torch.rand``
  tie-break only with ``noise=True`` (the default; the global generator).
- ``HoliTomLLM`` is an unregistered ``LLMReducer`` (one registry entry per paper), hooked
  after layer ``k - 1`` with that layer's attention; per sample, where the official code
  reads batch item 0 and the last position.
- ``index`` names a member of each merged token (its centre, first frame for static
  tokens); ``size`` counts what ``assign`` sends to it.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity
from reference.hosts.llava import LLMReducer, LLMSignals
from reference.ops import each_present_sample, keep_image_tokens
from reference.registry import register

SALIENCY = "holitom.saliency"


def static_windows(above: Tensor, max_window: int) -> tuple[list[tuple[int, int]], float]:
    """The windows ``(start, end)`` maximising the saved tokens, and that count.

    Args:
        above: ``[T - 1, P]`` bool, consecutive frames similar at a position.
    """
    t = above.shape[0] + 1
    saved = [[0.0] * t for _ in range(t)]  # saved[s][e]: window s..e
    for s in range(t - 1):
        run = torch.cumprod(above[s:].long(), dim=0).sum(1).tolist()  # [T - 1 - s]
        for e in range(s + 1, t):
            saved[s][e] = float(run[e - s - 1] * (e - s))
    dp, prev = [0.0] * t, [0] * t
    for i in range(t):
        best, start = (dp[i - 1] if i else 0.0), i
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            val = (dp[j] if j >= 0 else 0.0) + saved[j + 1][i]
            if val > best:
                best, start = val, j + 1
        dp[i], prev[i] = best, start
    windows, i = [], t - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    return windows[::-1], dp[-1]


def centres_and_merge(x: Tensor, k: int, knn: int, beta: float, noise: bool):
    """DPC-kNN on ``x [F, M, C]``: ``k`` centres per row (sorted); the rest join the nearest.

    Returns the merged centres ``[F, k, C]``, the centres ``[F, k]`` and each token's
    centre slot ``[F, M]``.
    """
    with torch.no_grad():
        dist = torch.cdist(x.float(), x.float()) / x.shape[-1] ** 0.5
        near = dist.topk(knn, dim=-1, largest=False).values
        density = (-(near**2).mean(-1)).exp()
        if noise:
            density = density + torch.rand(density.shape, device=x.device) * 1e-6
        denser = density[:, None, :] > density[:, :, None]
        far = dist.flatten(1).max(-1).values[:, None, None]
        delta = torch.where(denser, dist, far).min(-1).values
        centres = (delta * density).topk(k, dim=-1).indices.sort(-1).values  # [F, k]
        slot = dist.gather(2, centres[:, None, :].expand(-1, x.shape[1], -1)).argmin(-1)
        slot.scatter_(1, centres, torch.arange(k, device=x.device).expand_as(centres))
    centre = x.gather(1, centres[..., None].expand(-1, -1, x.shape[2]))
    member = torch.ones_like(slot, dtype=torch.bool).scatter(1, centres, False)  # non-centres
    count = torch.zeros(x.shape[0], k, device=x.device).scatter_add_(1, slot, member.float())
    total = x.new_zeros(centre.shape).scatter_add_(
        1, slot[..., None].expand_as(x), x * member[..., None]
    )
    mean = total / count.clamp(min=1)[..., None].to(x.dtype)
    merged = torch.where(count[..., None] > 0, beta * centre + (1 - beta) * mean, centre)
    return merged, centres, slot


@register
class HoliTom(TokenReducer):
    """HoliTom's outer-LLM merging of frame-major video tokens.

    Args:
        frame_tokens: tokens per frame ``P``; 0 turns the method off.
        retain_ratio: fraction of the video tokens kept (official 0.10).
        tau: similarity threshold of static positions (official 0.65 at 0.10, else 0.80).
        beta: weight of a centre in its merged token (official 0.6).
        d: share of contextual (clustered) tokens among a frame's kept ones (official 0).
        k: DPC-kNN neighbours, at most the number of centres (official 7).
        max_window: longest window in frames (official 1024).
        noise: the official random tie-break of densities.
    """

    catalog_id = "holitom"
    kind = "merging"
    where = "pre"
    needs = frozenset({"cls_attn"})
    test_configs: ClassVar[dict[str, dict]] = {
        "zero": {"frame_tokens": 0},
        "some": {"frame_tokens": 4, "retain_ratio": 0.25, "tau": 0.0, "noise": False},
    }

    def __init__(
        self,
        frame_tokens: int = 196,
        retain_ratio: float = 0.10,
        tau: float = 0.65,
        beta: float = 0.6,
        d: float = 0.0,
        k: int = 7,
        max_window: int = 1024,
        noise: bool = True,
    ):
        super().__init__()
        if frame_tokens < 0:
            raise ValueError(f"frame_tokens must be >= 0, got {frame_tokens}")
        if not 0 < retain_ratio <= 1:
            raise ValueError(f"retain_ratio must be in (0, 1], got {retain_ratio}")
        if not 0 <= d <= 1:
            raise ValueError(f"d must be in [0, 1], got {d}")
        if k < 1 or max_window < 1:
            raise ValueError(f"k must be >= 1 and max_window >= 1, got {k}, {max_window}")
        self.frame_tokens, self.retain_ratio, self.tau, self.beta = (
            frame_tokens,
            retain_ratio,
            tau,
            beta,
        )
        self.d, self.k, self.max_window, self.noise = d, k, max_window, noise

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        p = self.frame_tokens
        t = (n - prefix) // p if p else 0
        if t == 0:
            return n, n
        rest, video = n - t * p, t * p
        # Kept ~ r T P: up to one more per frame (ceil) and per window (round), or all
        # that is left when the raised ratio reaches 1 (at least one frame's worth).
        high = min(video, math.floor(self.retain_ratio * video) + 2 * t)
        low = max(0, min(p, math.floor(self.retain_ratio * video - t / 2)))
        return rest + low, rest + high

    def merge(self, feat: Tensor, saliency: Tensor) -> tuple[Tensor, list[Tensor]]:
        """HoliTom on one video ``feat [T, P, C]``; returns tokens ``[K, C]`` and each
        one's members (flat input indices, the representative first)."""
        t, p, _ = feat.shape
        unit = F.normalize(feat, p=2, dim=-1)
        above = F.cosine_similarity(unit[:-1], unit[1:], dim=-1) > self.tau  # [T - 1, P]
        windows, saved = static_windows(above, self.max_window)
        ratio = min(self.retain_ratio / ((t * p - saved) / (t * p)), 1)
        flat = torch.arange(t * p, device=feat.device).view(t, p)
        out, members = [], []
        for s, e in windows:
            w = e - s + 1
            static = above[s:e].all(0) if w > 1 else torch.zeros(p, dtype=torch.bool)
            dyn = (~static).nonzero()[:, 0]
            tok, mem = self._dynamic(
                feat[s : e + 1, dyn], saliency[s : e + 1, dyn], flat[s : e + 1, dyn], ratio
            )
            if w > 1:
                pos = static.nonzero()[:, 0]
                st, smem = self._static(feat[s : e + 1, pos].mean(0), flat[s : e + 1, pos], ratio)
                tok, mem = torch.cat([st, tok]), smem + mem
            out.append(tok)
            members += mem
        return torch.cat(out), members

    def _dynamic(self, x: Tensor, sal: Tensor, ids: Tensor, ratio: float):
        """A window's dynamic tokens ``x [W, n, C]``: per frame, dominant then contextual."""
        w, n, c = x.shape
        kept = math.ceil(n * ratio)
        dominant = round(kept * (1 - self.d))
        ctx = kept - dominant
        with torch.no_grad():
            top = sal.topk(dominant, dim=1).indices.sort(1).values  # [W, dominant]
        rest = torch.ones(w, n, dtype=torch.bool, device=x.device).scatter(1, top, False)
        parts = [x.gather(1, top[..., None].expand(-1, -1, c))]
        mem = [[ids[f, top[f, j]].view(1) for j in range(dominant)] for f in range(w)]
        if ctx > 0:
            ridx = torch.arange(n, device=x.device).expand(w, n)[rest].view(w, n - dominant)
            rx = x.gather(1, ridx[..., None].expand(-1, -1, c))
            merged, centres, slot = centres_and_merge(
                rx, ctx, min(self.k, ctx), self.beta, self.noise
            )
            parts.append(merged)
            for f in range(w):
                for j in range(ctx):
                    own = ridx[f][
                        (slot[f] == j)
                        & (torch.arange(n - dominant, device=x.device) != centres[f, j])
                    ]
                    mem[f].append(ids[f, torch.cat([ridx[f, centres[f, j]].view(1), own])])
        tokens = torch.cat(parts, 1).flatten(0, 1)  # frame-major
        return tokens, [m for frame in mem for m in frame]

    def _static(self, x: Tensor, ids: Tensor, ratio: float):
        """A window's static tokens ``x [n, C]`` (``ids [W, n]``) as ``round(n r')`` centres."""
        n = x.shape[0]
        k = round(n * ratio)
        if k == 0:
            return x[:0], []
        merged, centres, slot = centres_and_merge(x[None], k, min(self.k, k), self.beta, self.noise)
        mem = []
        for j in range(k):
            c = int(centres[0, j])
            others = [i for i in (slot[0] == j).nonzero()[:, 0].tolist() if i != c]
            mem.append(torch.cat([ids[:, c], ids[:, others].flatten()]))
        return merged[0], mem

    def _one(self, x: Tensor, size: Tensor, prefix: int, sal: Tensor) -> Reduction:
        n, c, p = x.shape[1], x.shape[2], self.frame_tokens
        t = (n - prefix) // p
        if t == 0:
            return identity(x, size)
        tok, members = self.merge(
            x[0, prefix : prefix + t * p].view(t, p, c), sal[: t * p].view(t, p)
        )
        dev, k = x.device, tok.shape[0]
        head, tail = torch.arange(prefix, device=dev), torch.arange(prefix + t * p, n, device=dev)
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
        present = signals.present
        if present is None:
            present = torch.ones(b, n, dtype=torch.bool, device=x.device)
        if SALIENCY in signals.state:
            sal = signals.state[SALIENCY].float()  # [B, T P] over the tokens after the prefix
            pad = n - prefix - sal.shape[1]
            sal = torch.cat([sal.new_zeros(b, prefix), sal, sal.new_zeros(b, pad)], 1)
        elif signals.cls_attn is not None:
            sal = signals.cls_attn.float().mean(1)  # [B, N]
        else:
            sal = x.new_zeros(b, n, dtype=torch.float)

        def reduce_one(i: int, tokens: Tensor) -> Reduction:
            sub, size = x[i : i + 1, tokens], signals.size[i : i + 1, tokens]
            return self._one(sub, size, prefix, sal[i, tokens][prefix:])

        return each_present_sample(x, signals.size, present, reduce_one)


class HoliTomLLM(LLMReducer):
    """HoliTom's inner-LLM merge: keep ``round(L (1 - r))`` image tokens after this layer,
    averaging each other one into its most similar kept token (attach after ``k - 1``)."""

    catalog_id = "holitom"
    kind = "merging"
    needs = frozenset({"last_attn"})

    def __init__(self, r: float = 0.5):
        super().__init__()
        if not 0 <= r <= 1:
            raise ValueError(f"r must be in [0, 1], got {r}")
        self.r = r

    @classmethod
    def paper_placement(cls, num_layers: int, **kwargs) -> dict[int, HoliTomLLM]:
        # HOLITOM_k = 18 of Qwen2-7B's 28 layers: merge after layer 17.
        return {min(17, num_layers - 1): cls(**kwargs)}

    def image_budget(self, n_image: int) -> tuple[int, int]:
        return round(n_image * (1 - self.r)), round(n_image * (1 - self.r))

    def forward(self, h: Tensor, signals: LLMSignals) -> Reduction:
        start, length = signals.image_start, signals.image_len
        keep_n = round(length * (1 - self.r))
        with torch.no_grad():
            score = signals.last_attn.float().mean(1)[:, start : start + length]  # [B, Nv]
            top = score.topk(keep_n, dim=1).indices  # [B, K], by attention (official order)
        h = h.clone()
        for b in range(h.shape[0]):
            rest = torch.ones(length, dtype=torch.bool, device=h.device)
            rest[top[b]] = False
            others = rest.nonzero()[:, 0] + start
            kept = top[b] + start
            if keep_n == 0 or len(others) == 0:
                continue
            with torch.no_grad():
                sim = F.normalize(h[b, others], dim=-1) @ F.normalize(h[b, kept], dim=-1).T
            for i, j in zip(others.tolist(), sim.argmax(1).tolist(), strict=True):
                h[b, kept[j]] = (h[b, kept[j]] + h[b, i]) / 2  # sequential, as the official loop
        return keep_image_tokens(h, None, start, length, top)
