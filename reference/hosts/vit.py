"""A minimal ViT host whose ``state_dict`` matches timm's ``VisionTransformer``.

Modifications against timm's ViT (class-token pooling, no layer scale, no
register tokens, eval-mode dropout):

- every block has two hook points for a ``TokenReducer``: ``"pre"`` (before the
  attention) and ``"mid"`` (after the attention, before the MLP, where ToMe and
  EViT act);
- attention runs through ``scaled_dot_product_attention``; the signals a
  method asks for are computed on the side: head-averaged keys, the CLS
  query's attention row only (one ``[B, H, 1, N]`` product), or the full maps
  and their pre-softmax logits (only for methods that need them); the next
  block's projections (``Signals.next_q``/``next_k``) are not given here, since
  a ``"mid"`` hook's output is not yet the next block's input (the MLP follows);
  a method that asks for them gets None;
- proportional attention (ToMe, Eq. 1): ``softmax(q k^T / sqrt(d) + log s)``
  with ``s`` the token sizes, switched on by ``proportional_attn``;
- a key-padding mask: a method that keeps a different number of tokens per
  sample pads each to the batch's largest count with empty slots and marks them
  0 in ``Reduction.mask``; the host carries that mask through later reductions
  and leaves masked keys out of every attention (each token still attends to
  itself, so no row is empty), so a sample's result never depends on its
  batch-mates. A soft mask, or one that carries a gradient (DynamicViT's and
  A-ViT's training paths), is applied as DynamicViT's attention policy
  (``models/dyvit.py``, ``softmax_with_policy``): the exponentiated logits are
  weighted by the mask, self-attention always counting, and renormalised with
  the official ``eps = 1e-6``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.core import Reduction, Signals, TokenReducer, identity


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, N, C]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        size: Tensor | None,
        needs: frozenset[str],
        keep: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``keep [B, N]``: key weights in [0, 1], None when every token is present."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, D]
        out, signals = attend(q, k, v, self.scale, size, needs, keep)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), signals


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    size: Tensor | None,
    needs: frozenset[str],
    keep: Tensor | None = None,
    dropout: float = 0.0,
    fused: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Multi-head attention ``[B, H, N, D]`` with the signals a method asked for.

    ``size [B, N, 1]`` adds the proportional-attention bias ``log s`` (None: off);
    ``keep [B, N]`` masks keys (see the module docstring). Without either, the
    attention is ``scaled_dot_product_attention`` itself, as in timm. Shared by this
    host and the timm adapter (``reference.adapters.timm``); ``fused=False`` always
    takes the explicit path, as timm's non-fused attention does.
    """
    bias = size.log().to(q.dtype)[:, None, None, :, 0] if size is not None else None
    policy = None
    if keep is not None and is_hard(keep):
        masked = key_padding_bias(keep, q.dtype)  # [B, 1, N, N]
        bias = masked if bias is None else bias + masked
    elif keep is not None:
        policy = keep
    signals: dict[str, Tensor] = {}
    if not fused or policy is not None or "attn" in needs or "attn_logits" in needs:
        logits = (q * scale) @ k.transpose(-2, -1)  # [B, H, N, N]
        if bias is not None:
            logits = logits + bias
        attn = logits.softmax(dim=-1) if policy is None else softmax_with_policy(logits, policy)
        out = F.dropout(attn, dropout) @ v if dropout else attn @ v
        signals["attn"] = attn
        signals["cls_attn"] = attn[:, :, 0]
        if "attn_logits" in needs:
            signals["attn_logits"] = logits
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        if "cls_attn" in needs:
            with torch.no_grad():
                logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
                if bias is not None:
                    logits = logits + bias[:, :, :1]
                signals["cls_attn"] = logits.softmax(dim=-1)[:, :, 0]  # [B, H, N]
    if "keys" in needs:
        signals["keys"] = k.mean(dim=1)  # [B, N, D]
    if "values" in needs:
        signals["values"] = v
    return out, signals


def is_hard(keep: Tensor) -> bool:
    """Whether a key mask is a plain present/absent mask (0 or 1, no gradient)."""
    return not keep.requires_grad and bool(((keep == 0) | (keep == 1)).all())


def key_padding_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, 1, N, N]`` additive bias: -inf where the key is absent, except on the diagonal."""
    n = keep.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=keep.device)
    allowed = (keep > 0)[:, None, None, :] | eye  # [B, 1, N, N]
    return torch.zeros(allowed.shape, dtype=dtype, device=keep.device).masked_fill(
        ~allowed, -torch.inf
    )


def softmax_with_policy(logits: Tensor, keep: Tensor, eps: float = 1e-6) -> Tensor:
    """DynamicViT's attention policy: softmax with each key weighted by ``keep [B, N]``.

    A token always counts for its own query; ``eps`` keeps a fully masked row finite.
    Computed in float32, returned in the logits' dtype.
    """
    n = logits.shape[-1]
    eye = torch.eye(n, dtype=torch.float32, device=logits.device)
    w = keep.float()[:, None, None, :]
    w = w + (1.0 - w) * eye  # [B, 1, N, N]
    e = (logits.float() - logits.float().amax(dim=-1, keepdim=True)).exp() * w
    return ((e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)


def keep_after(keep: Tensor | None, result: Reduction, own_mask: bool = True) -> Tensor | None:
    """The key mask after a reduction: its own ``mask`` (unless ``own_mask`` is False: a
    mask not meant for attention, ``TokenReducer.masks_attention``), else the previous
    one carried through ``result.index`` (a token the step created is present when its
    size is not 0). None when every token is present."""
    if own_mask and result.mask is not None:
        new = result.mask
    elif keep is None:
        return None
    else:
        index = result.index
        carried = keep.gather(1, index.clamp_min(0))
        new = torch.where(index >= 0, carried, (result.size[..., 0] > 0).to(keep.dtype))
    if new.requires_grad or not bool((new == 1).all()):
        return new
    return None


class QuickGELU(nn.Module):
    """CLIP's activation, ``x * sigmoid(1.702 x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm's ``Block`` with the two reduction hooks (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act: str = "gelu",
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)
        # One method, or a (pre, mid) pair: see ``split_hooks``.
        self.reducer: TokenReducer | tuple[TokenReducer, ...] | None = None

    def forward(self, x: Tensor, ctx: HostState) -> Tensor:
        pre, reducer = split_hooks(self.reducer)
        if pre is not None:
            x = ctx.apply(pre, x, {})
        needs = ctx.needs(reducer, x)
        size = ctx.size if ctx.proportional else None
        out, signals = self.attn(self.norm1(x), size, needs, ctx.keep)
        x = x + out
        if reducer is not None:
            x = ctx.apply(reducer, x, signals)
        return x + self.mlp(self.norm2(x))


def split_hooks(
    reducers: TokenReducer | tuple[TokenReducer, ...] | list[TokenReducer] | None,
) -> tuple[TokenReducer | None, TokenReducer | None]:
    """A block's ``(pre, mid)`` methods from one method or a sequence of them.

    A block runs at most one method before its attention (``where = "pre"``) and one
    after it (``"mid"``: the attention's signals are those of the tokens it saw).
    """
    if reducers is None:
        return None, None
    if isinstance(reducers, TokenReducer):
        reducers = (reducers,)
    pre = [r for r in reducers if r.where == "pre"]
    mid = [r for r in reducers if r.where != "pre"]
    if len(pre) > 1 or len(mid) > 1 or not all(isinstance(r, TokenReducer) for r in reducers):
        raise ValueError(
            "a block takes at most one 'pre' and one 'mid' TokenReducer, got "
            + ", ".join(f"{type(r).__name__} ({getattr(r, 'where', '?')})" for r in reducers)
        )
    return (pre[0] if pre else None), (mid[0] if mid else None)


class HostState:
    """Per-forward bookkeeping: token sizes, the reductions applied, method state."""

    def __init__(self, x: Tensor, prefix: int, proportional: bool):
        self.size = x.new_ones(x.shape[0], x.shape[1], 1)
        self.prefix = prefix
        self.proportional_wanted = proportional
        self.proportional = False  # only once sizes differ from one
        self.layer = 0
        self.reductions: list[Reduction] = []
        self.state: dict = {}
        self.keep: Tensor | None = None  # [B, N] key-padding mask; None: all present
        self._identity_index: Tensor | None = None  # [B, N] arange, for skipped methods

    def needs(self, reducer: TokenReducer | None, x: Tensor) -> frozenset[str]:
        """The signals to compute for ``reducer`` on ``x``: none for a method that would
        keep every token (``TokenReducer.keeps_all``; ``apply`` then skips it)."""
        if reducer is None or reducer.keeps_all(x.shape[1], self.prefix):
            return frozenset()
        return reducer.needs

    def apply(self, reducer: TokenReducer, x: Tensor, signals: dict[str, Tensor]) -> Tensor:
        if reducer.keeps_all(x.shape[1], self.prefix):  # a zero budget: nothing to run
            ar = self._identity_index
            if ar is None or ar.shape != x.shape[:2]:  # built once per token count
                ar = self._identity_index = identity(x, self.size).index
            self.reductions.append(Reduction(x, self.size, ar, ar))
            return x
        result = reducer(
            x,
            Signals(
                prefix=self.prefix,
                size=self.size,
                layer=self.layer,
                state=self.state,
                present=None if self.keep is None else self.keep > 0,
                **signals,
            ),
        )
        self.size = result.size
        self.keep = keep_after(self.keep, result, reducer.masks_attention)
        self.reductions.append(result)
        if self.proportional_wanted and result.num_tokens != x.shape[1]:
            self.proportional = True
        return result.x


class VisionTransformer(nn.Module):
    """ViT with a CLS token; parameter names follow timm so its weights load."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pre_norm: bool = False,
        act: str = "gelu",
        norm_eps: float = 1e-6,
    ):
        """``pre_norm``, ``act`` (``"gelu"`` or ``"quick_gelu"``) and ``norm_eps`` give
        CLIP's vision tower (timm's ``pre_norm``, CLIP's activation, LayerNorm eps 1e-5);
        the defaults are timm's ViT."""
        super().__init__()
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be 'gelu' or 'quick_gelu', got {act!r}")
        self.num_prefix_tokens = 1
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02
        )
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, qkv_bias, act, norm_eps) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.proportional_attn = False
        self.last_state: HostState | None = None
        nn.init.trunc_normal_(self.cls_token, std=1e-6)

    def forward_features(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm_pre(x)
        ctx = HostState(x, self.num_prefix_tokens, self.proportional_attn)
        for layer, block in enumerate(self.blocks):
            ctx.layer = layer
            x = block(x, ctx)
        self.last_state = ctx
        return self.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images)[:, 0])


CONFIGS = {
    "vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16),
}


def create(name: str, **overrides) -> VisionTransformer:
    """A host with timm's shapes for ``name`` (random weights; load timm's to use them)."""
    return VisionTransformer(**{**CONFIGS[name], **overrides})


def apply(
    model: VisionTransformer,
    reducers: dict[int, TokenReducer | tuple[TokenReducer, ...]],
    proportional_attn: bool = False,
) -> VisionTransformer:
    """Attach methods by block index (ToMe's ``apply_patch``): one method, or a
    ``(pre, mid)`` pair (``split_hooks``); returns the model."""
    for reducer in reducers.values():
        split_hooks(reducer)  # refuses what a block cannot run, before anything changes
    for block in model.blocks:
        block.reducer = None
    for layer, reducer in reducers.items():
        model.blocks[layer].reducer = (
            reducer if isinstance(reducer, TokenReducer) else tuple(reducer)
        )
    model.proportional_attn = proportional_attn
    return model


def tokens_after(model: VisionTransformer) -> list[int]:
    """Token count after each reduction of the last forward."""
    assert model.last_state is not None, "run a forward first"
    return [r.num_tokens for r in model.last_state.reductions]


__all__ = ["CONFIGS", "Block", "VisionTransformer", "apply", "create", "tokens_after"]
