"""Token reduction inside a timm ``VisionTransformer``, patched reversibly.

Every block of the model runs the reference ViT host's block step with timm's own
modules: its norms, ``Attention`` (q/k norm, scale norm, gate and dropouts
included), layer scale and drop path. A block with a reducer gets the same hooks
and signals as on the reference host (``"pre"`` before the attention, ``"mid"``
after it), the same key-padding mask for samples padded to one count, and
proportional attention when asked. Prefix tokens are the model's own
(``num_prefix_tokens``: class, distillation and register tokens), so they are
protected. Pooling: ``"token"`` reads the class token as timm does; ``"avg"``
averages the non-prefix tokens weighted by their size (a merged token counts as
the patches it holds; empty slots count 0), which equals timm's mean when nothing
was reduced; with no patch token left it is a zero vector (timm's mean of nothing
would be NaN). Nothing is added to the model: its ``state_dict`` is untouched, and
``detach`` removes the patched methods. Until a reduction masks or resizes tokens, a
block without a hook runs timm's own ``forward``, and a hook that asks for no signal
gets timm's own attention: the same arithmetic without the hooks' Python.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from reference.adapters import Overrides
from reference.core import TokenReducer
from reference.hosts.vit import HostState, attend, split_hooks


def is_timm_vit(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # timm not installed: no model can be a timm ViT
        return False
    return isinstance(model, VisionTransformer)


def unsupported(model: nn.Module) -> str | None:
    """Why the adapter cannot patch ``model``, or None when it can."""
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block

    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            return f"block {i} is a {type(block).__name__}; only timm's pre-norm Block is supported"
        if type(block.attn) is not Attention:
            return f"block {i} uses {type(block.attn).__name__}; only timm's Attention is supported"
    if getattr(model, "attn_pool", None) is not None:
        return "attention pooling (global_pool='map') is not supported"
    if model.global_pool not in ("token", "avg", ""):
        return f"global_pool={model.global_pool!r} is not supported (token, avg or none)"
    return None


class Patch:
    """The patched state of one model; ``last_state`` is the host state of the last forward."""

    def __init__(self, model: nn.Module, reducers: dict[int, TokenReducer], proportional: bool):
        self.model, self.reducers, self.proportional = model, reducers, proportional
        self.last_state: HostState | None = None
        self._overrides = Overrides()
        for i, block in enumerate(model.blocks):
            self._set(block, "forward", self._block_forward(block, i))
        original_pool = model.pool
        self._set(model, "pool", lambda x, pool_type=None: self._pool(original_pool, x, pool_type))

    def _set(self, obj: object, name: str, value: object) -> None:
        self._overrides.set(obj, name, value)

    def undo(self) -> None:
        self._overrides.undo()

    def _block_forward(self, block: nn.Module, layer: int) -> Callable[..., Tensor]:
        pre, reducer = split_hooks(self.reducers.get(layer))
        plain = type(block).forward.__get__(block)  # timm's own, unpatched

        def forward(x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
            if attn_mask is not None or is_causal:
                raise ValueError("attach: a timm attention mask cannot be combined with reduction")
            if layer == 0:
                self.last_state = HostState(x, self.model.num_prefix_tokens, self.proportional)
            ctx = self.last_state
            ctx.layer = layer
            if pre is not None:
                x = ctx.apply(pre, x, {})
            needs = ctx.needs(reducer, x)
            untouched = ctx.keep is None and not ctx.proportional  # no mask, no size bias yet
            if untouched and (reducer is None or reducer.keeps_all(x.shape[1], ctx.prefix)):
                if reducer is not None:
                    ctx.apply(reducer, x, {})  # records its identity (x: the block input)
                return plain(x)  # timm's own block
            if not needs and untouched:
                out = block.attn(block.norm1(x))  # no signal wanted: timm's attention
                signals: dict[str, Tensor] = {}
            else:
                out, signals = self._attention(block.attn, block.norm1(x), ctx, needs)
            x = x + block.drop_path1(block.ls1(out))
            if reducer is not None:
                x = ctx.apply(reducer, x, signals)
            return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

        return forward

    @staticmethod
    def _attention(
        a: nn.Module, x: Tensor, ctx: HostState, needs: frozenset[str]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        b, n, _ = x.shape
        gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
        qkv = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        size = ctx.size if ctx.proportional else None
        dropout = a.attn_drop.p if a.training else 0.0
        out, signals = attend(q, k, v, a.scale, size, needs, ctx.keep, dropout, a.fused_attn)
        out = a.norm(out.transpose(1, 2).reshape(b, n, a.attn_dim))
        if gate is not None:
            out = out * gate
        return a.proj_drop(a.proj(out)), signals

    def _pool(self, original: Callable, x: Tensor, pool_type: str | None) -> Tensor:
        model, ctx = self.model, self.last_state
        pool_type = model.global_pool if pool_type is None else pool_type
        p = 0 if model.pool_include_prefix else model.num_prefix_tokens
        if pool_type == "avg" and x.shape[1] == p:  # every patch token was removed
            return x.new_zeros(x.shape[0], x.shape[2])
        if pool_type != "avg" or ctx is None or (ctx.keep is None and bool((ctx.size == 1).all())):
            return original(x, pool_type)
        w = ctx.size[:, p:, 0].to(x.dtype)
        if ctx.keep is not None:
            w = w * (ctx.keep[:, p:] > 0).to(x.dtype)
        return (x[:, p:] * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)


def attach(model: nn.Module, reducers: dict[int, TokenReducer], proportional: bool) -> Patch:
    """Patch ``model`` (a timm ``VisionTransformer``); ``Patch.undo`` restores it."""
    reason = unsupported(model)
    if "pool" in model.__dict__:
        reason = "it already has methods attached; detach them first"
    if reason is not None:
        raise ValueError(f"attach: this timm model cannot be patched: {reason}")
    hooks = {layer: split_hooks(r) for layer, r in reducers.items()}
    param = next(model.parameters(), None)
    if param is not None:
        for pair in hooks.values():
            for reducer in pair:
                if reducer is not None:
                    reducer.to(device=param.device)
    return Patch(model, reducers, proportional)


__all__ = ["Patch", "attach", "is_timm_vit", "unsupported"]
