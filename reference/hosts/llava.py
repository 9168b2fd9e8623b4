"""A LLaVA-style host: ViT vision tower, MLP projector, LLaMA-style decoder.

Layout of one sample: ``[prefix text][image tokens][instruction text][padding]``
(LLaVA-1.5 puts the image after the system prompt). Instructions of different
lengths are right-padded; ``valid`` masks the padding out of every attention.

Hooks:
- ``vision``: a ViT ``TokenReducer`` applied to the vision tower's features at
  the selected layer (CLS included as prefix; LLaVA then drops CLS; the empty
  slots of a reducer that pads samples to one count, ``Reduction.mask`` 0, are
  padding to the language model, like the instruction's), with the
  CLS attention row and keys of that layer (FasterVLM, VisionZip), and, for a
  reducer that names them in ``needs``, that layer's full maps and pre-softmax
  logits (FiCoCo-V) and the next block's full-width query and key projections
  of these features (PruMerge; None when the selected layer is the last block).
- ``projector``: a ``reference.projector.Projector`` (resampler, abstractor,
  pooling projector) in place of the MLP projector: it maps the selected layer's
  patch features (after the vision reducer, if any) to its own number of image
  tokens, with every vision block's output at hand (``ProjectorSignals``). A projector
  whose samples emit different counts pads them and marks the real tokens in
  ``state["projector_valid"] [B, M]`` (the rest are padding to the language model). One
  whose ``fuses_text`` is True (LLaVA-Mini) gets the prompt's embeddings in
  ``state["text_embeds"]`` (``[prefix; instruction]``, with ``state["text_mask"]``; the
  caller's own, if given) and puts ``state["fused_text"]`` of the same shape, which the
  language model then sees in place of the prompt's embeddings (decoded tokens stay plain).
- ``llm[layer]``: an ``LLMReducer`` applied to the hidden states after decoder
  layer ``layer`` during prefill, with the attention of each sample's last
  instruction token to every key of that layer (FastV), and, for a reducer that
  names it in ``needs``, the row the next layer would compute from these hidden
  states (its input norm, q/k projections and RoPE at the current positions;
  PyramidDrop). Only rows that are needed are computed: attention itself runs
  through ``scaled_dot_product_attention``.
- ``sequence``: a ``SequenceMethod`` that changes the prefill itself, with up to three
  hooks (see its docstring): learned tokens placed right after the image tokens (VoCo-LLaMA's
  VoCo tokens, registers), an attention rule for every layer on top of the causal and padding
  mask, after which the keys the prompt's last token may not attend leave every layer's cache
  (decoded tokens attend what that token attends), and routed layers that only some tokens go
  through, the others skipping them, each layer caching the tokens it ran (p-MoD). LLM
  reducers see the learned tokens as text (never dropped); none may act at a routed layer.

Video: ``prefill`` also takes ``images [B, T, 3, H, W]``. Each frame runs through the
vision tower as its own sample (the batch ``B * T``, a sample's frames together), and the
image run becomes one contiguous run of ``T * Nv`` tokens, frame after frame (LLaVA's
``mlp2x_gelu`` maps every frame's patches). The host sets ``state["frames"] = T`` (also for
``T = 1``; an image leaves the key unset), and a projector receives the LLaMA-VID convention
(``reference.llama_vid``): features ``[B, T * N, C_v]`` frame after frame,
``ProjectorSignals.grid`` the grid of ONE frame, and ``layers`` each ``[B, T * (1 + N), C_v]``
(every frame's CLS and patches in turn, ``'(b t) n c -> b (t n) c'``). A vision reducer runs
per frame: it sees ``B * T`` samples of one frame each, with a copy of ``state`` whose
``"text"`` / ``"text_mask"`` are repeated for every frame (new keys it writes are copied
back); a sample's frames may keep different counts (their empty slots are padding, as for
images). The frame-major video reducers (DyCoke, FastVID, ``frame_tokens = P``) expect the
whole video as one sequence, which this hook does not give: use them on projected tokens.

Dropped tokens keep nothing. By default kept tokens keep their original position
ids, and decoding continues at ``max(position) + 1``. A reducer whose ``renumber``
is True (or every reducer, with ``apply(renumber=True)``) renumbers the valid
tokens ``0..n-1`` after its drop, as the official PyramidDrop and MustDrop code
does; each later layer then decodes at its own sequence's length (the prompt's
full length less the tokens dropped before that layer). Each decoder layer
caches the keys and values of the tokens it saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, gather_tokens
from reference.hosts.vit import HostState, VisionTransformer
from reference.projector import Projector, ProjectorSignals


@dataclass(frozen=True)
class LlavaConfig:
    vision: dict
    vision_layer: int  # index of the ViT block whose output feeds the projector
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float = 10000.0
    eps: float = 1e-5


TINY = LlavaConfig(
    vision=dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=0),
    vision_layer=1,
    hidden=64,
    layers=4,
    heads=4,
    kv_heads=2,
    intermediate=128,
    vocab=101,
)
# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 patches, penultimate layer), Vicuna-7B.
LLAVA_15_7B = LlavaConfig(
    vision=dict(img_size=336, patch_size=14, embed_dim=1024, depth=24, num_heads=16, num_classes=0),
    vision_layer=22,
    hidden=4096,
    layers=32,
    heads=32,
    kv_heads=32,
    intermediate=11008,
    vocab=32000,
)


@dataclass
class LLMSignals:
    """What a decoder layer exposes to an ``LLMReducer`` after it ran.

    Attributes:
        image_start: index of the first image token (the same for every sample).
        image_len: number of image tokens now in the sequence.
        valid: ``[B, N]`` False for padding.
        last_attn: ``[B, H, N]`` attention of each sample's last valid token.
        next_attn: ``[B, H, N]`` the same row as the next decoder layer would
            compute it from these hidden states, before any drop
            (``needs = {"next_attn"}`` only; None after the last layer).
        attn: ``[B, H, N, N]`` full attention maps (``needs = {"attn"}`` only).
        keys: ``[B, H_kv, N, D]`` that layer's keys after RoPE (``needs = {"keys"}`` only).
        final_norm: the language model's final norm (DART compares normed hidden states).
        layer: index of the decoder layer that just ran.
        positions: ``[B, N]`` RoPE positions of the tokens (those of padding unused).
        state: per-forward scratch space shared by the reducers.
    """

    image_start: int
    image_len: int
    valid: Tensor
    last_attn: Tensor | None = None
    next_attn: Tensor | None = None
    attn: Tensor | None = None
    keys: Tensor | None = None
    final_norm: nn.Module | None = None
    layer: int = 0
    positions: Tensor | None = None
    state: dict = field(default_factory=dict)


class LLMReducer(nn.Module):
    """Base of methods that act inside the language model during prefill.

    ``forward(h, signals)`` returns a ``Reduction`` over the whole sequence whose
    ``index`` keeps every text and padding token, in order; only image tokens
    (``image_start <= i < image_start + image_len``) may be dropped or merged.
    ``renumber``: after this reducer's drop, the host renumbers the positions of
    the valid tokens ``0..n-1`` (False: kept tokens keep their positions).
    """

    catalog_id: str = ""
    kind: str = ""
    needs: frozenset[str] = frozenset({"last_attn"})
    basis: str = "official code"
    renumber: bool = False
    test_configs: ClassVar[dict[str, dict]] = {"zero": {}, "some": {}}

    def image_budget(self, n_image: int) -> tuple[int, int]:
        """Fewest and most image tokens left (equal when exact)."""
        raise NotImplementedError

    @classmethod
    def paper_placement(cls, num_layers: int, **kwargs) -> dict[int, LLMReducer]:
        """The method at the decoder layers its paper uses, for a decoder of ``num_layers``
        (``reference.attach`` without ``layers``); ``kwargs`` go to the constructor.
        Empty: the paper gives no placement, and the caller must name the layers."""
        return {}


@dataclass
class Layout:
    """Where a prefill's tokens are, for a ``SequenceMethod``'s hooks.

    Attributes:
        image_start: index of the first image token (the same for every sample).
        image_len: number of image tokens now in the sequence.
        inserted: number of the method's learned tokens, right after the image tokens.
        valid: ``[B, N]`` False for padding.
        positions: ``[B, N]`` RoPE positions.
        layer: the decoder layer about to run (``route`` only).
        state: the prefill's scratch space.
    """

    image_start: int
    image_len: int
    inserted: int
    valid: Tensor
    positions: Tensor
    layer: int = 0
    state: dict = field(default_factory=dict)


class SequenceMethod(nn.Module):
    """Base of methods that change the language model's prefill itself
    (``LlavaHost.apply(sequence=...)``); each hook is optional (the base does nothing):

    - ``tokens(batch) -> [B, M, hidden]``: learned tokens placed right after the image
      tokens (``[prefix][image][M tokens][instruction]``), valid, numbered on like text.
    - ``attention(layout) -> [B, N, N]`` bool: which keys each query may attend in every
      decoder layer of the prefill, on top of the causal and padding mask; each token must
      be allowed itself. Decoded tokens attend what the prompt's last token attends (and each
      other); keys that the last token may not attend leave every layer's cache after the
      prefill (where a sample's count differs they stay, masked).
    - ``route(layout, h) -> [B, K]`` (None: the whole layer): the sorted indices of the tokens
      that go through decoder layer ``layout.layer`` (every text and padding token among
      them); the others skip it. ``merge(layout, h, index, mid, mlp) -> [B, N, C]`` then
      makes the layer's output from its input ``h``, the gone-through tokens' residual after
      the attention ``mid [B, K, C]`` and MLP output ``mlp [B, K, C]``. That layer's cache
      holds the keys and values of the ``K`` tokens only.

    ``for_host(cfg, **kwargs)`` builds the method for a host configuration.
    """

    catalog_id: str = ""
    kind: str = ""
    basis: str = "official code"
    test_configs: ClassVar[dict[str, dict]] = {"some": {}}

    @classmethod
    def for_host(cls, cfg: LlavaConfig, **kwargs) -> SequenceMethod:
        return cls(hidden=cfg.hidden, **kwargs)

    def tokens(self, batch: int) -> Tensor | None:
        return None

    def attention(self, layout: Layout) -> Tensor | None:
        return None

    def route(self, layout: Layout, h: Tensor) -> Tensor | None:
        return None

    def merge(self, layout: Layout, h: Tensor, index: Tensor, mid: Tensor, mlp: Tensor) -> Tensor:
        raise NotImplementedError


def bench_setting(cls: type, keep: int, n_image: int, cfg: LlavaConfig) -> dict | None:
    """Where and how to attach ``cls`` to keep ``keep`` of ``n_image`` visual tokens.

    Returns ``host.apply`` keyword arguments (``vision=...`` / ``llm={...}``), from
    the class method ``bench_setting`` that a VLM method may define; None when the
    method has none (it is then not benchmarked).
    """
    method = getattr(cls, "bench_setting", None)
    return None if method is None else method(keep, n_image, cfg)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate ``x [B, H, N, D]`` by ``positions [B, N]`` (LLaMA's half-split RoPE)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.float()[:, None, :, None] * inv  # [B, 1, N, D/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.hidden // cfg.heads
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.hidden, bias=False)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def _split(self, x: Tensor, heads: int) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, heads, self.head_dim).transpose(1, 2)  # [B, H, N, D]

    @torch.no_grad()
    def _last_row(self, q: Tensor, k_all: Tensor, mask: Tensor, last: Tensor) -> Tensor:
        """``[B, H, N]``: softmax attention of each sample's ``last`` query (float32 softmax)."""
        q_last = q.gather(2, last[:, None, None, None].expand(-1, q.shape[1], 1, q.shape[3]))
        logits = (q_last @ k_all.transpose(-1, -2)) * self.head_dim**-0.5  # [B, H, 1, N]
        row_mask = mask.gather(2, last[:, None, None, None].expand(-1, 1, 1, mask.shape[3]))
        logits = logits.float().masked_fill(~row_mask, -torch.inf)
        return logits.softmax(-1).to(q.dtype)[:, :, 0]

    @torch.no_grad()
    def last_row_attention(
        self, h: Tensor, positions: Tensor, mask: Tensor, last: Tensor
    ) -> Tensor:
        """``[B, H, N]``: the last query's attention this layer would compute for input ``h``."""
        cfg = self.cfg
        x = self.input_layernorm(h)
        q = rope(self._split(self.q_proj(x), cfg.heads), positions, cfg.rope_theta)
        k = rope(self._split(self.k_proj(x), cfg.kv_heads), positions, cfg.rope_theta)
        return self._last_row(q, k.repeat_interleave(cfg.heads // cfg.kv_heads, 1), mask, last)

    def forward(
        self,
        h: Tensor,
        positions: Tensor,
        mask: Tensor,
        cache: dict | None,
        needs: frozenset[str],
        last: Tensor | None,
        split: bool = False,
    ) -> tuple[Tensor | tuple[Tensor, Tensor], dict]:
        """``mask [B, 1, Nq, Nk]`` is True where a query may attend a key. ``split``: return
        ``(h + attention, mlp)``, the residual stream after the attention and the MLP's output,
        instead of their sum (a routed layer mixes them)."""
        cfg = self.cfg
        x = self.input_layernorm(h)
        q = rope(self._split(self.q_proj(x), cfg.heads), positions, cfg.rope_theta)
        k = rope(self._split(self.k_proj(x), cfg.kv_heads), positions, cfg.rope_theta)
        v = self._split(self.v_proj(x), cfg.kv_heads)
        if cache is not None:
            if "k" in cache:  # decoding: attend to everything this layer cached
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        groups = cfg.heads // cfg.kv_heads
        k_all, v_all = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        signals: dict[str, Tensor] = {}
        scale = self.head_dim**-0.5
        if "attn" in needs:
            logits = (q @ k_all.transpose(-1, -2)) * scale
            signals["attn"] = logits.masked_fill(~mask, -torch.inf).softmax(-1)
        if "last_attn" in needs and last is not None:
            signals["last_attn"] = self._last_row(q, k_all, mask, last)
        if "keys" in needs:
            signals["keys"] = k
        b, _, n, _ = out.shape
        h = h + self.o_proj(out.transpose(1, 2).reshape(b, n, cfg.heads * self.head_dim))
        x = self.post_attention_layernorm(h)
        mlp = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return ((h, mlp) if split else h + mlp), signals


def _per_frame(state: dict, frames: int) -> dict:
    """The state a vision reducer sees on a video's frames (``B * T`` samples): a copy whose
    per-sample text (``"text"``, ``"text_mask"``) is repeated for every frame."""
    out = dict(state)
    for key in ("text", "text_mask"):
        if isinstance(out.get(key), Tensor):
            out[key] = out[key].repeat_interleave(frames, dim=0)
    return out


def _square(allowed: Tensor, index: Tensor) -> Tensor:
    """The rows and columns ``index [B, K]`` of ``allowed [B, N, N]``: ``[B, K, K]``."""
    rows = allowed.gather(1, index[..., None].expand(-1, -1, allowed.shape[2]))
    return rows.gather(2, index[:, None].expand(-1, index.shape[1], -1))


def _forget(layer_cache: dict, attendable: Tensor) -> None:
    """Drop from one layer's cache the valid keys no later token may attend
    (``attendable [B, Nk]``); where samples would keep different counts, mask them instead."""
    valid = layer_cache["valid"]
    keep = attendable | ~valid  # padding stays padding
    count = keep.sum(1)
    if keep.all() or not bool((count == count[:1]).all()):
        layer_cache["valid"] = valid & attendable
        return
    index = (~keep).long().argsort(dim=1, stable=True)[:, : int(count[0])]  # kept keys, in order
    layer_cache["valid"] = valid.gather(1, index)
    slots = index[:, None, :, None].expand(
        -1, layer_cache["k"].shape[1], -1, layer_cache["k"].shape[3]
    )
    layer_cache["k"], layer_cache["v"] = (
        layer_cache["k"].gather(2, slots),
        layer_cache["v"].gather(2, slots),
    )


class LlavaHost(nn.Module):
    """Vision tower + projector + decoder; ``prefill`` and ``decode`` share one KV cache."""

    def __init__(self, cfg: LlavaConfig = TINY):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTransformer(**cfg.vision)
        dim_v = cfg.vision["embed_dim"]
        self.mm_projector = nn.Sequential(
            nn.Linear(dim_v, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden)
        )
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.vision_reducer: TokenReducer | None = None
        self.projector: Projector | None = None
        self.llm_reducers = nn.ModuleDict()
        self.llm_by_layer: dict[int, LLMReducer] = {}
        self.renumber: bool | None = None
        self.sequence: SequenceMethod | None = None
        self.last_trace: list[Reduction] = []
        self.last_state: dict = {}

    # -- configuration -------------------------------------------------------
    def apply(
        self,
        vision: TokenReducer | None = None,
        llm: dict[int, LLMReducer] | None = None,
        renumber: bool | None = None,
        projector: Projector | None = None,
        sequence: SequenceMethod | None = None,
    ) -> LlavaHost:
        """Attach the reducers. ``renumber``: renumber positions ``0..n-1`` after every
        LLM-stage drop (True), never (False), or as each reducer's ``renumber`` says (None).
        ``projector``: a projector method in place of the MLP projector (None: the MLP).
        ``sequence``: a ``SequenceMethod`` (learned tokens, attention mask, routed layers)."""
        self.vision_reducer = vision
        self.projector = projector
        self.sequence = sequence
        self.llm_by_layer = dict(llm or {})
        self.renumber = renumber
        # Registered as submodules too, so .to() and .parameters() reach them.
        self.llm_reducers = nn.ModuleDict({str(k): v for k, v in self.llm_by_layer.items()})
        return self

    # -- vision ---------------------------------------------------------------
    def encode_images(self, images: Tensor, state: dict) -> tuple[Tensor, Reduction | None]:
        """Projected image tokens ``[B, Nv', hidden]`` (CLS dropped, as LLaVA does).

        ``images [B, 3, H, W]``, or a video ``[B, T, 3, H, W]``: then every frame runs
        through the tower as its own sample (``B * T``, frames of a sample together) and
        the tokens come out frame after frame, ``[B, T * Nv', hidden]``; ``state["frames"]
        = T`` (see the module docstring).
        """
        frames = None
        if images.dim() == 5:
            b, frames = images.shape[:2]
            images = images.flatten(0, 1)  # 'b t c h w -> (b t) c h w'
            state["frames"] = frames
        vt = self.vision_tower
        x = vt.patch_embed(images)
        x = torch.cat([vt.cls_token.expand(x.shape[0], -1, -1), x], 1) + vt.pos_embed
        x = vt.norm_pre(x)
        ctx = HostState(x, 1, proportional=False)
        reducer, reduction = self.vision_reducer, None
        layers: list[Tensor] = []
        for i, block in enumerate(vt.blocks[: self.cfg.vision_layer + 1]):
            ctx.layer = i
            if i < self.cfg.vision_layer:
                x = block(x, ctx)
                layers.append(x)
                continue
            needs = (reducer.needs if reducer else frozenset()) | {"cls_attn", "keys"}
            out, signals = block.attn(block.norm1(x), None, needs)
            x = x + out
            x = x + block.mlp(block.norm2(x))
            layers.append(x)
            if needs & {"next_q", "next_k"} and i + 1 < len(vt.blocks):
                # The next block's full-width q and k of this output (None after the last).
                nxt, c = vt.blocks[i + 1], x.shape[-1]
                qkv = nxt.attn.qkv(nxt.norm1(x))  # [B, N, 3C]: q, k, v before the head split
                signals["next_q"], signals["next_k"] = qkv[..., :c], qkv[..., c : 2 * c]
            if reducer is not None:
                projector = self.mm_projector if self.projector is None else None
                frame_state = state if frames is None else _per_frame(state, frames)
                reduction = reducer(
                    x,
                    Signals(
                        prefix=1,
                        size=ctx.size,
                        layer=i,
                        state=frame_state,
                        projector=projector,
                        **signals,
                    ),
                )
                if frame_state is not state:  # what the reducer wrote, back to the video's
                    state.update({k: v for k, v in frame_state.items() if k not in state})
                x = reduction.x
        patches = x[:, 1:]
        if frames is not None:
            c = x.shape[-1]
            patches = patches.reshape(b, -1, c)  # '(b t) n c -> b (t n) c'
            layers = [y.reshape(b, -1, c) for y in layers]  # [B, T * (1 + N), C_v]
        if self.projector is not None:
            side = vt.patch_embed.num_patches**0.5
            grid = (int(side), int(side))
            signals = ProjectorSignals(layers=tuple(layers), grid=grid, state=state)
            return self.projector(patches, signals), reduction
        return self.mm_projector(patches), reduction

    def _image_valid(self, vis: Tensor, reduction: Reduction | None, state: dict) -> Tensor:
        """``[B, Nv']`` False for the empty slots a vision reducer padded a sample with, or
        those a projector marks in ``state["projector_valid"]`` (samples of different counts,
        LongVU)."""
        reducer = self.vision_reducer
        if self.projector is not None:  # the projector's tokens, all present unless it says
            marked = state.get("projector_valid")
            if marked is not None and marked.shape == vis.shape[:2]:
                return marked.to(device=vis.device, dtype=torch.bool)
            reduction = None
        if reduction is None or reduction.mask is None or not reducer.masks_attention:
            return torch.ones(vis.shape[:2], dtype=torch.bool, device=vis.device)
        return (reduction.mask[:, 1:] > 0).reshape(vis.shape[:2])  # a video's frames in a row

    # -- language model -------------------------------------------------------
    def _mask(
        self, valid_q: Tensor, valid_k: Tensor, causal_offset: int, allowed: Tensor | None = None
    ) -> Tensor:
        """``[B, 1, Nq, Nk]``: causal by sequence index, padding keys masked, and only where
        ``allowed [B, Nq, Nk]`` (a ``SequenceMethod``'s rule; None: everywhere)."""
        nq, nk = valid_q.shape[1], valid_k.shape[1]
        qi = torch.arange(nq, device=valid_q.device)[:, None] + causal_offset
        causal = torch.arange(nk, device=valid_q.device)[None, :] <= qi  # [Nq, Nk]
        mask = causal[None, None] & valid_k[:, None, None, :]
        if allowed is not None:
            mask = mask & allowed[:, None]
        # A padding query attends to itself only, so no row is empty (its output is unused).
        eye = torch.zeros_like(mask)
        if nq == nk:
            eye = torch.eye(nq, dtype=torch.bool, device=mask.device)[None, None].expand_as(mask)
        return mask | (eye & ~valid_q[:, None, :, None])

    def prefill(
        self,
        images: Tensor,
        prefix_ids: Tensor,
        suffix_ids: Tensor,
        suffix_valid: Tensor,
        extra_ids: Tensor | None = None,
        replay: list[Tensor] | None = None,
        state: dict | None = None,
    ) -> tuple[Tensor, dict]:
        """Run the prompt; return each sample's next-token logits ``[B, vocab]`` and the cache.

        ``images [B, 3, H, W]``, or a video ``[B, T, 3, H, W]`` (see the module docstring).
        ``extra_ids [B, E]``: tokens appended after the (padded) instruction, as if
        decoded. ``replay``: the ``index`` of every LLM reduction of an earlier
        prefill (``last_trace``), applied at the same hooks instead of running the
        reducers, the appended tokens kept: the cache-free recomputation of a
        pruned sequence. ``state``: initial scratch values for the reducers; it is
        copied, never written (the working copy is ``last_state`` afterwards).
        """
        state = {} if state is None else dict(state)
        self.last_state = state
        prompt = [self.embed_tokens(prefix_ids), self.embed_tokens(suffix_ids)]
        fuses = self.projector is not None and self.projector.fuses_text
        if fuses:  # a projector that fuses the prompt with the image (LLaVA-Mini)
            state.setdefault("text_embeds", torch.cat(prompt, 1))
            prompt_valid = [torch.ones_like(prefix_ids, dtype=torch.bool), suffix_valid.bool()]
            state.setdefault("text_mask", torch.cat(prompt_valid, 1))
        vis, reduction = self.encode_images(images, state)
        b, device = vis.shape[0], vis.device
        fused = state.get("fused_text") if fuses else None
        if fused is not None and fused.shape[1] == prefix_ids.shape[1] + suffix_ids.shape[1]:
            prompt = list(fused.split([prefix_ids.shape[1], suffix_ids.shape[1]], 1))
        seq = self.sequence
        learned = seq.tokens(b) if seq is not None else None  # [B, M, hidden]
        parts = [prompt[0], vis, prompt[1]]
        valid_parts = [
            torch.ones(b, prefix_ids.shape[1], dtype=torch.bool, device=device),
            self._image_valid(vis, reduction, state),
            suffix_valid.bool(),
        ]
        inserted = 0 if learned is None else learned.shape[1]
        if learned is not None:
            parts.insert(2, learned.to(vis.dtype))
            valid_parts.insert(2, torch.ones(b, inserted, dtype=torch.bool, device=device))
        if extra_ids is not None:
            parts.append(self.embed_tokens(extra_ids))
            valid_parts.append(torch.ones_like(extra_ids, dtype=torch.bool))
        h, valid = torch.cat(parts, 1), torch.cat(valid_parts, 1)
        extra = 0 if extra_ids is None else extra_ids.shape[1]
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # [B, N]; pads are never queried
        image_start, image_len = prefix_ids.shape[1], vis.shape[1]
        layout = Layout(image_start, image_len, inserted, valid, positions, state=state)
        allowed = seq.attention(layout) if seq is not None else None  # [B, N, N] or None
        pending = None if replay is None else list(replay)
        self.last_trace = []
        caches: list[dict] = []
        for i, layer in enumerate(self.layers):
            reducer = self.llm_by_layer.get(i)
            needs = reducer.needs if reducer is not None and pending is None else frozenset()
            last = valid.long().cumsum(1).argmax(1)  # each sample's last valid token
            # This layer decodes at its own next position: ``pos_shift`` below the prompt's.
            next_pos = positions.gather(1, last[:, None])[:, 0] + 1
            layout = Layout(image_start, image_len, inserted, valid, positions, i, state)
            route = seq.route(layout, h) if seq is not None else None  # [B, K] or None
            if route is not None and reducer is not None:
                raise ValueError(f"layer {i} is routed; an LLMReducer cannot act after it")
            keys = torch.arange(h.shape[1], device=device).expand(b, -1) if route is None else route
            caches.append({"valid": valid.gather(1, keys), "next_pos": next_pos})
            if allowed is not None:  # the keys this layer caches that the last token may attend
                row = allowed.gather(1, last[:, None, None].expand(-1, 1, allowed.shape[2]))
                caches[i]["attendable"] = row[:, 0].gather(1, keys)
            if route is not None:
                sub_allowed = None if allowed is None else _square(allowed, route)
                sub_valid = caches[i]["valid"]
                (mid, mlp), _ = layer(
                    gather_tokens(h, route),
                    positions.gather(1, route),
                    self._mask(sub_valid, sub_valid, 0, sub_allowed),
                    caches[i],
                    frozenset(),
                    None,
                    split=True,
                )
                h = seq.merge(layout, h, route, mid, mlp)
                continue
            mask = self._mask(valid, valid, 0, allowed)
            h, signals = layer(h, positions, mask, caches[i], needs, last)
            if reducer is None:
                continue
            if "next_attn" in needs:
                signals["next_attn"] = (
                    self.layers[i + 1].last_row_attention(h, positions, mask, last)
                    if i + 1 < len(self.layers)
                    else None
                )
            n = h.shape[1]
            if pending is not None:
                recorded = pending.pop(0)  # [B, N' - extra] into the sequence without extras
                tail = torch.arange(n - extra, n, device=device).expand(b, extra)
                index = torch.cat([recorded, tail], 1)
                h = gather_tokens(h, index)
            else:
                red = reducer(
                    h,
                    LLMSignals(
                        image_start,
                        image_len,
                        valid,
                        layer=i,
                        positions=positions,
                        state=state,
                        final_norm=self.norm,
                        **signals,
                    ),
                )
                index, h = red.index, red.x
                self.last_trace.append(index)
            image_len -= n - index.shape[1]  # only image tokens are ever removed
            valid, positions = valid.gather(1, index), positions.gather(1, index)
            if allowed is not None:
                allowed = _square(allowed, index)
            if reducer.renumber if self.renumber is None else self.renumber:
                positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        last = valid.long().cumsum(1).argmax(1)
        out = h.gather(1, last[:, None, None].expand(-1, 1, h.shape[2]))
        next_pos = caches[0]["next_pos"] if caches else positions.gather(1, last[:, None])[:, 0] + 1
        for layer_cache in caches:
            layer_cache["pos_shift"] = next_pos - layer_cache.pop("next_pos")
            if "attendable" in layer_cache:
                _forget(layer_cache, layer_cache.pop("attendable"))
        cache = {"layers": caches, "next_pos": next_pos}
        return self.lm_head(self.norm(out))[:, 0], cache

    @torch.no_grad()
    def decode(self, token_ids: Tensor, cache: dict) -> Tensor:
        """One decoding step for ``token_ids [B]``; updates ``cache``; returns logits."""
        h = self.embed_tokens(token_ids[:, None])  # [B, 1, hidden]
        for layer, layer_cache in zip(self.layers, cache["layers"], strict=True):
            positions = (cache["next_pos"] - layer_cache.get("pos_shift", 0))[:, None]
            layer_cache["valid"] = torch.cat(
                [layer_cache["valid"], torch.ones_like(token_ids[:, None], dtype=torch.bool)], 1
            )
            mask = layer_cache["valid"][:, None, None, :]  # [B, 1, 1, Nk]
            h, _ = layer(h, positions, mask, layer_cache, frozenset(), None)
        cache["next_pos"] = cache["next_pos"] + 1
        return self.lm_head(self.norm(h))[:, 0]
