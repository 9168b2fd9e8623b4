"""Language-model-stage token reduction inside a transformers LLaVA or Qwen2-VL / Qwen2.5-VL.

``reference.attach(model, "fastv", ratio=0.5)`` puts a registered ``LLMReducer``
(FastV, PyramidDrop, MustDrop, DART, SparseVLM, ...; an unregistered one such as
``FiCoCoL`` as an instance with ``layers=[...]``) after the decoder layers its
``paper_placement`` names (or ``layers=[...]``), and runs it during prefill the
way the reference LLaVA host (``reference.hosts.llava``) does, so the same method on the
same weights gives the host's logits (``to_reference_host``). One patch serves
LLaVA's Llama decoder (1-D RoPE) and Qwen2-VL's / Qwen2.5-VL's Qwen2 decoder (3-D
mRoPE); ``hf_llava`` and ``hf_qwen2_5_vl`` send their ``LLMReducer`` methods here.

Modifications (instance attributes, set by ``LLMPatch`` and removed by ``undo``;
nothing enters the model's ``state_dict``):
- ``model.model.forward`` (the ``LlavaModel`` / ``Qwen2_5_VLModel``): records, per
  call, where the image placeholders are (``input_ids == image_token_id``) and the
  2-D padding mask.
- Qwen only, ``forward`` of the language model: records the call's ``[3, B, N]``
  mRoPE positions (``t, h, w``; the decoder layers get only their cos and sin),
  derived as the text model derives them (from ``get_rope_index`` in prefill,
  ``rope_deltas`` and the cache length when decoding).
- ``forward`` of every decoder layer of the language model. In prefill (an empty
  or absent cache and image placeholders in the input), after a layer that has a
  method, the layer's signals are computed as the host computes them: the last
  valid token's attention row of that layer (the query of that one token
  recomputed from the layer's input norm, q projection and RoPE; the keys read
  from the layer's cache, or projected again without one; float32 softmax; never
  an ``N x N`` map),
  ``next_attn`` (the same row from the next layer's input norm and q/k on this
  layer's output, at the same positions), the layer's keys after RoPE
  (``"keys"``), the language model's final norm, and full maps only for a method
  whose ``needs`` has ``"attn"``. The method sees the sequence in the host's layout
  (``[prefix][image][instruction][padding]``, the image at one index for the
  whole batch; a sample with a shorter prefix gets padding slots before it;
  several images in a sample, text between them, are one image span in their
  order, that text joining the instruction; ``LLMSignals.positions`` is the
  temporal row under mRoPE), and its ``Reduction.index`` is mapped back to the
  model's sequence: text and padding kept in their places, the image tokens left
  of each image back in that image's place, in the method's order. The later
  layers then get the shorter sequence with the host's causal/padding mask
  (boolean under ``sdpa``, None there without padding; additive under ``eager``)
  and RoPE at the kept tokens' own positions (under mRoPE each kept token keeps
  its ``(t, h, w)``, as the third-party Qwen ports of FastV-style pruning do by
  gathering cos/sin at the kept indices; PyramidDrop and FastV have no official
  Qwen port), or, after a
  method whose ``renumber`` is True, at ``0..n-1`` over the valid tokens: under
  mRoPE on all three axes (the host's and PyramidDrop's official renumbering,
  ``position_ids = arange(n)``, carried over literally; the kept image tokens
  then lose their 2-D layout; ``PyramidDrop(renumber=False)`` keeps it).
- Each layer's KV cache then holds its own length (``DynamicCache`` concatenates
  per layer). For every cache that went through a pruned prefill, the patch keeps
  (weakly, keyed by the cache object) each shortened layer's key validity and its
  ``pos_shift`` (per mRoPE axis); a later forward with that cache (decoding) gets,
  in those layers, a mask over that layer's cached keys and RoPE at
  ``position_ids - pos_shift``: the host's decoding. Qwen's decoding positions
  (``rope_deltas``, or ``generate``'s last position + 1) count the full prompt, so
  without renumbering the shift is 0 and decoding continues where the unpruned
  prompt ends. Layers before the first drop, and every
  layer when nothing was dropped, run with the model's own mask and positions
  (zero budget gives the plain model's logits exactly).

Limits (refused with the reason): a method that needs a signal not listed above,
a Llama (LLaVA-1.5's Vicuna) or Qwen2-VL / Qwen2.5-VL text decoder, without
sliding-window layers, a ``DynamicCache`` (the default), ``sdpa``
or ``eager`` attention (the adapter gives each shortened layer its own 4-D mask;
FlashAttention's 2-D masks and flex attention's block masks are not built), the
same number of image tokens in every sample of a batch (the method sees one image
span for the batch: LLaVA-1.5, 576 an image; Qwen, images of the same total size;
run other samples one at a time), no video (Qwen's video
tokens would count as text). ``generate(use_cache=False)`` recomputes the whole
prompt at every step and so prunes again from each step's last token (as the
host would on that sequence); cached generation reproduces the host's
prefill-then-decode. Not followed: a cache cropped or rebuilt outside the model
(assisted decoding), and image tokens in a forward that continues a cache (they
are not pruned). On Qwen, a vision-stage method and a language-model method are
not attached together (refused: detach the first).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.adapters import Overrides
from reference.hosts.llava import LLMReducer, LLMSignals

try:
    from transformers import DynamicCache
except ImportError:  # the adapter is only reached with a transformers model
    DynamicCache = ()

# text_config.model_type values whose layers this adapter patches; the Qwen ones use mRoPE
DECODERS = ("llama", "mistral", "qwen2_vl_text", "qwen2_5_vl_text")
MROPE = ("qwen2_vl_text", "qwen2_5_vl_text")
ATTENTION = ("sdpa", "eager")
NEEDS = frozenset({"last_attn", "next_attn", "attn", "keys"})  # the host's LLMSignals computed here


def unsupported(model: nn.Module) -> str | None:
    """Why LLM-stage methods cannot run in this model (None: they can)."""
    text = model.config.text_config
    if text.model_type not in DECODERS:
        return f"the decoder is {text.model_type!r}; LLM-stage methods support {DECODERS}"
    sliding = getattr(text, "sliding_window", None) is not None and text.model_type == "mistral"
    if sliding or "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        return (
            "some decoder layers use sliding-window attention; the adapter rebuilds full "
            "causal masks only"
        )
    impl = text._attn_implementation
    if impl not in ATTENTION:
        return (
            f"attn_implementation {impl!r}: after a drop the adapter gives each layer "
            f"its own 4-D mask, which only {ATTENTION} take"
        )
    return None


# -- masks, RoPE and the host's signals ---------------------------------------------
def host_mask(valid: Tensor) -> Tensor:
    """``[B, 1, N, N]`` True where a query may attend a key: causal by sequence index,
    padding keys masked, a padding query attends to itself (``LlavaHost._mask``)."""
    n = valid.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=valid.device)
    return (causal & valid[:, None, None, :]) | (eye & ~valid[:, None, :, None])


def decode_mask(cached: Tensor, new: Tensor) -> Tensor:
    """``[B, 1, Nq, Nc + Nq]`` for ``Nq`` new tokens after ``Nc`` cached keys."""
    nq = new.shape[1]
    past = cached[:, None, None, :].expand(-1, 1, nq, -1)
    return torch.cat([past, host_mask(new)], -1)


def layer_mask(build: Callable[[], Tensor], dtype: torch.dtype, impl: str, plain: bool):
    """The mask ``build()`` gives, in the form the attention implementation takes.
    ``plain``: no padding, and as many queries as keys or one query; sdpa then takes
    None (its ``is_causal`` path, or full attention for one query), as transformers'
    ``sdpa_mask`` does, and no mask is built."""
    if impl == "sdpa" and plain:
        return None
    allowed = build()
    if impl == "eager":  # additive, as transformers' ``eager_mask``
        zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x [B, H, N, D]`` rotated by ``cos, sin [B, N, D]`` (Llama's ``apply_rotary_pos_emb``)."""
    d = x.shape[-1] // 2
    rotated = torch.cat([-x[..., d:], x[..., :d]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def project(
    layer: nn.Module,
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    rows: Tensor | None,
    keys: Tensor | None = None,
):
    """RoPE'd queries (of ``rows [B]`` only, or all) and keys of ``layer`` for its input
    ``h [B, N, C]``: ``[B, H, Nq, D]``, ``[B, H_kv, N, D]`` (``keys``: the layer's own,
    read from its cache, instead of projecting them again)."""
    a = layer.self_attn
    x = layer.input_layernorm(h)
    b, n, c = x.shape
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    k = keys
    if k is None:
        k = rope(a.k_proj(x).view(b, n, -1, a.head_dim).transpose(1, 2), cos, sin)
    if rows is not None:
        x = x.gather(1, rows[:, None, None].expand(-1, 1, c))
        pick = rows[:, None, None].expand(-1, 1, cos.shape[-1])
        cos, sin = cos.gather(1, pick), sin.gather(1, pick)
    q = rope(a.q_proj(x).view(b, x.shape[1], -1, a.head_dim).transpose(1, 2), cos, sin)
    return q, k


@torch.no_grad()
def last_row(
    layer: nn.Module,
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    valid: Tensor,
    keys: Tensor | None = None,
) -> Tensor:
    """``[B, H, N]``: the attention of each sample's last valid token in ``layer``
    for input ``h``, float32 softmax (``DecoderLayer._last_row``)."""
    last = valid.long().cumsum(1).argmax(1)
    q, k = project(layer, h, cos, sin, last, keys)
    k = k.repeat_interleave(layer.self_attn.num_key_value_groups, 1)
    logits = (q @ k.transpose(-1, -2)) * layer.self_attn.scaling  # [B, H, 1, N]
    keys = torch.arange(h.shape[1], device=h.device)
    row = (keys[None] <= last[:, None]) & valid  # [B, N]
    logits = logits.float().masked_fill(~row[:, None, None], -torch.inf)
    return logits.softmax(-1).to(q.dtype)[:, :, 0]


@torch.no_grad()
def full_maps(
    layer: nn.Module,
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    valid: Tensor,
    keys: Tensor | None = None,
) -> Tensor:
    """``[B, H, N, N]`` attention maps of ``layer`` (methods that need ``"attn"`` only)."""
    q, k = project(layer, h, cos, sin, None, keys)
    k = k.repeat_interleave(layer.self_attn.num_key_value_groups, 1)
    logits = (q @ k.transpose(-1, -2)) * layer.self_attn.scaling
    return logits.masked_fill(~host_mask(valid), -torch.inf).softmax(-1)


def mrope_positions(kwargs: dict) -> Tensor:
    """``[3, B, N]`` mRoPE positions of a Qwen-VL text model's call, as its ``forward``
    derives them (None: after the cache; 2-D: the same on each axis; 4 rows: the first
    is the text positions for packed masks, dropped)."""
    tokens = kwargs.get("inputs_embeds")
    tokens = kwargs["input_ids"] if tokens is None else tokens
    given, (b, n) = kwargs.get("position_ids"), tokens.shape[:2]
    if given is None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        return (torch.arange(n, device=tokens.device) + past).view(1, 1, -1).expand(3, b, -1)
    if given.dim() == 2:
        return given[None].expand(3, -1, -1)
    return given[1:] if given.shape[0] == 4 else given


# -- the host's layout for the method ------------------------------------------------
def host_layout(valid: Tensor, image: Tensor) -> tuple[Tensor, int, int]:
    """``[B, W]`` source index of each slot of the host's layout ``[prefix][image]
    [instruction][padding]`` (-1: an added padding slot, so that the image starts at
    the same index in every sample), that index and the image length. Several image
    runs in a sample make one image, in their order; the text between them joins
    the instruction."""
    runs = []
    for v, m in zip(valid.tolist(), image.tolist(), strict=True):
        img = [j for j, is_img in enumerate(m) if is_img]
        start = img[0]
        before = [j for j in range(start) if v[j]]
        after = [j for j in range(start, len(v)) if v[j] and not m[j]]
        pads = [j for j in range(len(v)) if not v[j] and not m[j]]
        runs.append((before, img, after, pads))
    prefix = max(len(r[0]) for r in runs)
    rows = [[-1] * (prefix - len(r[0])) + r[0] + r[1] + r[2] + r[3] for r in runs]
    width = max(map(len, rows))
    src = torch.tensor([r + [-1] * (width - len(r)) for r in rows], device=valid.device)
    return src, prefix, len(runs[0][1])


def gather_slots(t: Tensor, src: Tensor, dim: int) -> Tensor:
    """``t`` re-indexed along ``dim`` by ``src [B, W]``; zeros at the added slots (-1)."""
    shape = [src.shape[0]] + [1] * (t.dim() - 1)
    shape[dim] = src.shape[1]
    idx = src.clamp(min=0).view(shape)
    expand = list(t.shape)
    expand[dim] = src.shape[1]
    out = t.gather(dim, idx.expand(expand))
    return out * (src >= 0).view(shape).to(out.dtype) if out.dtype != torch.bool else out


# -- the patch --------------------------------------------------------------------
@dataclass
class _Call:
    """One forward of the patched LLaVA."""

    image: Tensor  # [B, N] image placeholders of the input tokens
    mask2d: Tensor | None  # the caller's 2-D padding mask over cache + input
    state: dict
    prefill: bool = False
    record: _Record | None = None  # decoding with a cache that a pruned prefill filled
    valid: Tensor | None = None  # prefill: [B, N'] of the current sequence
    positions: Tensor | None = None  # [R, B, N'] R = 1 (RoPE) or 3 (mRoPE: t, h, w)
    given: Tensor | None = None  # mRoPE: [3, B, N] the language model's positions of this call
    changed: bool = False  # a drop happened: later layers get ``mask`` and ``rope``
    mask: Tensor | None = None
    rope: tuple[Tensor, Tensor] | None = None
    layer_valid: list = field(default_factory=list)  # per layer: its keys' validity or None
    layer_next: list = field(default_factory=list)  # per layer: its next position [R, B]


@dataclass
class _Record:
    """Per cache: each shortened layer's key validity (None: as layer 0) and ``pos_shift``
    (``[R, B]``)."""

    valid: list
    pos_shift: list


class LLMPatch:
    """The patched state of one model; ``undo`` restores it.

    Attributes:
        reducers: the methods by decoder layer.
        renumber: as ``LlavaHost.apply``'s (None: each method's ``renumber``).
        last_trace: the ``index`` of each reduction of the last prefill, into the
            sequence entering it (the host's ``last_trace``).
        last_positions: the ``[R, B, N']`` positions (R = 1 for RoPE, 3 for mRoPE's
            t, h, w) the sequence leaving each reduction of the last prefill has.
        last_state: the reducers' scratch space of the last prefill.
    """

    def __init__(
        self, model: nn.Module, reducers: dict[int, LLMReducer], renumber: bool | None = None
    ):
        self.model, self.reducers, self.renumber = model, dict(reducers), renumber
        self.state: dict = {}
        self.last_trace: list[Tensor] = []
        self.last_positions: list[Tensor] = []
        self.last_state: dict = {}
        self._call: _Call | None = None
        self._records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._overrides = Overrides()
        self.lm = model.model.language_model
        self.mrope = model.config.text_config.model_type in MROPE
        self._set(model.model, "forward", self._wrap_model(model.model.forward))
        if self.mrope:  # the layers get no 3-D positions, only their cos and sin
            self._set(self.lm, "forward", self._wrap_language_model(self.lm.forward))
        for i, layer in enumerate(self.lm.layers):
            self._set(layer, "forward", self._wrap_layer(i, layer, layer.forward))

    def _set(self, owner: object, name: str, value: object) -> None:
        self._overrides.set(owner, name, value)

    def undo(self) -> None:
        self._overrides.undo()

    # -- LlavaModel.forward: where the image is, and the padding -------------------
    def _wrap_model(self, original: Callable) -> Callable:
        def call(input_ids=None, *args, **kwargs):
            if args:
                raise ValueError("attach: pass the model's inputs by keyword")
            kwargs["input_ids"] = input_ids  # LLaVA-NeXT passes them by position
            ids, embeds = input_ids, kwargs.get("inputs_embeds")
            image_id = self.model.config.image_token_id
            if ids is not None:
                image = ids == image_id
            else:  # placeholders found by their embedding, as ``get_placeholder_mask``
                token = torch.tensor(image_id, device=embeds.device)
                image = (embeds == self.model.get_input_embeddings()(token)).all(-1)
            mask2d = kwargs.get("attention_mask")
            if mask2d is not None and mask2d.dim() != 2:
                raise ValueError("attach: LLM-stage methods need a 2-D attention_mask")
            reason = unsupported(self.model)
            if reason is not None:
                raise ValueError(f"attach: {reason}")
            video = getattr(self.model.config, "video_token_id", None)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            prefill = cache is None or cache.get_seq_length() == 0  # a decoded token may be one
            if kwargs.get("pixel_values_videos") is not None or (
                prefill and ids is not None and video is not None and bool((ids == video).any())
            ):
                raise ValueError(
                    "attach: LLM-stage methods prune image tokens; a video's tokens would "
                    "count as text and its 3-D positions are not followed: not supported"
                )
            self._call = _Call(image, None if mask2d is None else mask2d.bool(), dict(self.state))
            try:
                return original(**kwargs)
            finally:
                self._call = None

        return call

    def _wrap_language_model(self, original: Callable) -> Callable:
        """mRoPE: note the ``[3, B, N]`` positions, normalised as the text model does."""

        def call(*args, **kwargs):
            c = self._call
            if c is not None and not args:
                c.given = mrope_positions(kwargs)
            return original(*args, **kwargs)

        return call

    def _rope(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin ``[B, N, D]`` of ``positions [R, B, N]`` from the model's own rotary."""
        return self.lm.rotary_emb(x, positions if self.mrope else positions[0])

    def _positions(self, c: _Call, position_ids: Tensor | None, b: int) -> Tensor:
        """``[R, B, N]`` positions of this call's tokens."""
        if self.mrope:
            return c.given.expand(-1, b, -1)
        return position_ids.expand(b, -1)[None]

    # -- decoder layers ---------------------------------------------------------------
    def _wrap_layer(self, i: int, layer: nn.Module, original: Callable) -> Callable:
        def call(hidden_states: Tensor, *args, **kwargs):
            c = self._call
            if c is None or args:
                return original(hidden_states, *args, **kwargs)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if i == 0:
                self._begin(c, hidden_states, kwargs.get("position_ids"), cache)
            if c.prefill:
                self._enter(c)
                if c.changed:
                    kwargs.update(attention_mask=c.mask, position_embeddings=c.rope)
                    if kwargs.get("position_ids") is not None:  # Llama's; Qwen's text ids
                        kwargs["position_ids"] = c.positions[0]
                out = original(hidden_states, **kwargs)
                if i in self.reducers:
                    rope_in = kwargs["position_embeddings"]
                    out = self._reduce(i, layer, hidden_states, out, rope_in, cache)
                if i == len(self.lm.layers) - 1:
                    self._finish(c, cache)
                return out
            if c.record is not None and c.record.valid[i] is not None:
                kwargs.update(
                    self._decoding(i, c, hidden_states, kwargs.get("position_ids"), cache)
                )
            return original(hidden_states, **kwargs)

        return call

    def _begin(self, c: _Call, h: Tensor, position_ids: Tensor | None, cache) -> None:
        """Layer 0: prefill (empty cache, image in the input) or decoding."""
        past = cache.get_seq_length(0) if cache is not None else 0
        b, n = h.shape[:2]
        if past > 0:
            c.record = self._records.get(cache)
            return
        if cache is not None:
            self._records.pop(cache, None)
            if bool(c.image.any()) and not isinstance(cache, DynamicCache):
                raise ValueError(
                    f"attach: LLM-stage methods need a DynamicCache (its layers hold "
                    f"different lengths after a drop), not a {type(cache).__name__}"
                )
        c.valid = torch.ones(b, n, dtype=torch.bool, device=h.device)
        if c.mask2d is not None:
            c.valid = c.mask2d[:, -n:].clone()
        c.image = c.image & c.valid
        counts = c.image.sum(1)
        if not bool(counts.any()):
            return  # no image: nothing to reduce
        if len(set(counts.tolist())) != 1:
            raise ValueError(
                "attach: LLM-stage methods need the same number of image tokens in every "
                f"sample of a batch (the method sees one image span); got {counts.tolist()}"
            )
        c.prefill = True
        c.positions = self._positions(c, position_ids, b)
        self.last_trace, self.last_positions = [], []
        self.last_state = c.state

    def _enter(self, c: _Call) -> None:
        """Note the sequence entering a layer (its cache's keys, its next position)."""
        last = c.valid.long().cumsum(1).argmax(1)
        c.layer_valid.append(c.valid if c.changed else None)
        r = c.positions.shape[0]
        c.layer_next.append(c.positions.gather(2, last.view(1, -1, 1).expand(r, -1, 1))[..., 0] + 1)

    def _finish(self, c: _Call, cache) -> None:
        if cache is None or not any(v is not None for v in c.layer_valid):
            return
        shift = [c.layer_next[0] - nxt for nxt in c.layer_next]
        self._records[cache] = _Record(list(c.layer_valid), shift)

    def _decoding(self, i: int, c: _Call, h: Tensor, position_ids: Tensor | None, cache) -> dict:
        """Mask and RoPE of a shortened layer for the new tokens ``h [B, Nq, C]``."""
        record, (b, nq) = c.record, h.shape[:2]
        cached = record.valid[i]
        if cache.get_seq_length(i) != cached.shape[1]:
            raise RuntimeError("attach: this cache no longer matches the prefill that filled it")
        new = torch.ones(b, nq, dtype=torch.bool, device=h.device)
        if c.mask2d is not None:
            new = c.mask2d[:, -nq:]
        record.valid[i] = torch.cat([cached, new], 1)
        impl = self.model.config.text_config._attn_implementation
        plain = nq == 1 and bool(cached.all()) and bool(new.all())
        out = {"attention_mask": layer_mask(lambda: decode_mask(cached, new), h.dtype, impl, plain)}
        shift = record.pos_shift[i]  # [R, B]
        if bool((shift != 0).any()):
            positions = self._positions(c, position_ids, b) - shift[..., None]
            out["position_embeddings"] = self._rope(h, positions)
            if position_ids is not None:
                out["position_ids"] = positions[0]
        return out

    def _reduce(self, i: int, layer: nn.Module, h_in: Tensor, h: Tensor, rope_in, cache) -> Tensor:
        """Run the method after layer ``i`` and shorten the sequence (``LlavaHost.prefill``)."""
        c, reducer = self._call, self.reducers[i]
        cos, sin = rope_in
        needs, signals = reducer.needs, {}
        keys = None  # this layer's keys after RoPE, as its attention used them
        cached = getattr(cache, "layers", None)
        known = cached is not None and getattr(cached[i], "keys", None) is not None
        if known and cached[i].keys.shape[-2] == h_in.shape[1]:  # a prefill's own keys
            keys = cached[i].keys
        if "last_attn" in needs:
            signals["last_attn"] = last_row(layer, h_in, cos, sin, c.valid, keys)
        if "next_attn" in needs:
            nxt = self.lm.layers[i + 1] if i + 1 < len(self.lm.layers) else None
            signals["next_attn"] = None if nxt is None else last_row(nxt, h, cos, sin, c.valid)
        if "attn" in needs:
            signals["attn"] = full_maps(layer, h_in, cos, sin, c.valid, keys)
        if "keys" in needs:  # [B, H_kv, N, D]
            first = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
            with torch.no_grad():
                signals["keys"] = (
                    keys if keys is not None else project(layer, h_in, cos, sin, first)[1]
                )
        src, start, length = host_layout(c.valid, c.image)
        dims = {"last_attn": [-1], "next_attn": [-1], "attn": [2, 3], "keys": [2]}
        for name, value in signals.items():
            for dim in dims[name] if value is not None else []:
                value = gather_slots(value, src, dim)
            signals[name] = value
        valid = gather_slots(c.valid, src, 1) & (src >= 0)
        view = LLMSignals(
            start,
            length,
            valid,
            layer=i,
            positions=gather_slots(c.positions[0], src, 1),
            state=c.state,
            final_norm=self.lm.norm,
            **signals,
        )
        red = reducer(gather_slots(h, src, 1), view)
        index, order = self._back(src, red.index, c.image)
        self.last_trace.append(index)
        x = red.x.gather(1, order[..., None].expand(-1, -1, red.x.shape[-1]))
        n = h.shape[1]
        identity = index.shape[1] == n and torch.equal(
            index, torch.arange(n, device=h.device)[None].expand_as(index)
        )
        image = c.image.gather(1, index)
        if not torch.equal((~image).sum(1), (~c.image).sum(1)):
            raise ValueError(f"attach: {type(reducer).__name__} dropped a text or padding token")
        c.valid, c.image = c.valid.gather(1, index), image
        if not identity:
            renumber = reducer.renumber if self.renumber is None else self.renumber
            r = c.positions.shape[0]
            c.positions = c.positions.gather(2, index[None].expand(r, -1, -1))
            if renumber:  # every axis of mRoPE too: see the module docstring
                c.positions = (c.valid.long().cumsum(1) - 1).clamp(min=0)[None].expand(r, -1, -1)
            impl = self.model.config.text_config._attn_implementation
            c.mask = layer_mask(lambda: host_mask(c.valid), x.dtype, impl, bool(c.valid.all()))
            c.rope = self._rope(x, c.positions)
            c.changed = True
        self.last_positions.append(c.positions)
        return x

    @staticmethod
    def _back(src: Tensor, index: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """The method's ``index`` (into the host layout) as an index into the model's
        sequence, and the columns of its ``x`` in that order: the added slots go, text
        and padding return to their places, and the image tokens left of each image
        run take its place, in the method's order."""
        orig = src.gather(1, index)  # [B, N'] -1 at added slots
        real = orig >= 0
        n = image.shape[1]
        at = torch.arange(n, device=image.device).expand_as(image)
        starts = image & ~F.pad(image, (1, 0))[:, :-1]
        run = torch.where(starts, at, 0).cummax(1).values  # [B, N] the start of each run
        anchor = torch.where(image, run, at)  # a text token's own place, an image run's start
        key = torch.where(real, anchor.gather(1, orig.clamp(min=0)), n)
        kept = real.sum(1)
        if len(set(kept.tolist())) != 1:
            raise ValueError("attach: the method kept the added padding slots unevenly")
        order = key.argsort(dim=1, stable=True)[:, : int(kept[0])]
        return orig.gather(1, order), order


def attach_method(model: nn.Module, method, instance, layers, kwargs: dict):
    """``reference.attach`` of an LLM-stage method (a class, an instance or a dict of
    instances by decoder layer) to a transformers LLaVA or Qwen-VL: returns the ``Handle``."""
    from reference.adapters import Handle, check_layers

    count = model.config.text_config.num_hidden_layers
    if isinstance(method, dict):
        if kwargs or layers is not None:
            raise ValueError("attach: a dict of instances takes no layers or keyword arguments")
        if not all(isinstance(m, LLMReducer) for m in method.values()):
            raise ValueError("attach: every method of the dict must act in the language model")
        reducers = {i: method[i] for i in check_layers(method, count, "decoder layer")}
    elif instance is not None:
        if layers is None:
            raise ValueError("attach: say where a method instance acts: layers=[...]")
        reducers = {i: instance for i in check_layers(layers, count, "decoder layer")}
    elif layers is not None:
        reducers = {i: method(**kwargs) for i in check_layers(layers, count, "decoder layer")}
    else:
        reducers = method.paper_placement(count, **kwargs)
        if not reducers:
            raise ValueError(
                f"attach: {method.catalog_id!r} has no paper placement; pass layers=[...]"
            )
    for reducer in reducers.values():
        if reducer.needs - NEEDS:
            raise ValueError(
                f"attach: {type(reducer).__name__} needs {sorted(reducer.needs - NEEDS)}, "
                f"which this adapter does not compute (it gives {sorted(NEEDS)})"
            )
    reason = unsupported(model)
    # Qwen's vision-stage patch hands the decoder inputs_embeds in which the image
    # placeholders are already visual features: this patch would find no image.
    vision = model.config.text_config.model_type in MROPE and "generate" in model.__dict__
    if reason is None and ("forward" in model.model.__dict__ or vision):
        reason = "it already has methods attached; detach them first"
    if reason is not None:
        name = type(model).__name__
        raise ValueError(f"attach: this transformers {name} cannot be patched: {reason}")
    param = next(model.parameters())
    for reducer in reducers.values():
        reducer.to(device=param.device).eval()
    patch = LLMPatch(model, reducers)
    handle = Handle(model, dict(reducers), patch.undo)
    handle.patch = patch
    return handle


__all__ = ["LLMPatch", "attach_method", "host_layout", "last_row", "unsupported"]
