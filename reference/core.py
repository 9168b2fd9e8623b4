"""The shared contract of every reference implementation.

A method reduces tokens ``x [B, N, C]`` whose first ``prefix`` tokens (CLS,
distillation) are protected: they stay, unchanged and in place. It reads the
signals it needs from ``Signals`` and returns a ``Reduction`` that tells the
caller how to follow the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclass
class Signals:
    """What a block exposes to a method at its hook.

    Attributes:
        prefix: number of protected prefix tokens at the front of ``x``.
        size: ``[B, N, 1]`` how many input patches each token stands for.
        keys: ``[B, N, D]`` attention keys averaged over heads (ToMe's metric).
        cls_attn: ``[B, H, N]`` attention of the CLS query to every token.
        attn: ``[B, H, N, N]`` full attention probabilities; only computed for
            methods that declare ``needs = {"attn"}``.
        attn_logits: ``[B, H, N, N]`` the pre-softmax attention logits of the same
            layer, ``q k^T / sqrt(D)`` plus the proportional-attention ``log s``
            bias where the host uses one (``needs = {"attn_logits"}``).
        values: ``[B, H, N, D]`` attention values (``needs = {"values"}``).
        next_q: ``[B, N, C]`` the next block's full-width query projection of the
            hook's output (its ``qkv(norm1(x))`` split before the heads, bias
            included); ``needs = {"next_q"}`` or ``{"next_k"}`` asks for both, and
            a host gives them only where the hook's output is the next block's
            input (the LLaVA host's vision hook, when a block follows it).
        next_k: ``[B, N, C]`` the next block's full-width key projection (as ``next_q``).
        projector: at a VLM's vision hook, the module that maps the hook's patch tokens
            ``[B, M, C]`` to the language model's inputs (LLaVA's MLP projector); None
            elsewhere. For methods that measure on the projected tokens (DivPrune).
        present: ``[B, N]`` bool, False for an empty slot that an earlier reduction
            padded a sample with (see ``Reduction.mask``); None when every token is
            present. A method whose statistics run over all tokens (a softmax, a
            quantile) leaves empty slots out, so a sample never depends on its batch.
        layer: index of the block the hook belongs to.
        state: per-forward scratch space a method may use to carry its own
            state across layers (e.g. A-ViT's halting scores, a keep mask).
    """

    prefix: int
    size: Tensor
    keys: Tensor | None = None
    cls_attn: Tensor | None = None
    attn: Tensor | None = None
    attn_logits: Tensor | None = None
    values: Tensor | None = None
    next_q: Tensor | None = None
    next_k: Tensor | None = None
    projector: nn.Module | None = None
    present: Tensor | None = None
    layer: int = 0
    state: dict = field(default_factory=dict)


@dataclass
class Reduction:
    """The result of one reduction step.

    Attributes:
        x: ``[B, N', C]`` the reduced tokens; the prefix tokens come first.
        size: ``[B, N', 1]`` token sizes after the step (for proportional attention).
        index: ``[B, N']`` for each output token, the input token it continues
            (the kept token, or the destination of a merge); ``-1`` for a token
            the step created (a fused or summary token).
        assign: ``[B, N]`` for each input token, the output slot it went into;
            ``-1`` when it was dropped without being merged anywhere.
        mask: ``[B, N']`` keep weights: 0 for the empty slots that pad a sample
            to the batch's largest count, or soft/hard weights for training paths
            that keep the token count fixed (DynamicViT's Gumbel mask); None when
            every output token is present. The hosts leave masked tokens out of
            attention.
    """

    x: Tensor
    size: Tensor
    index: Tensor
    assign: Tensor
    mask: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]


def identity(x: Tensor, size: Tensor) -> Reduction:
    """The reduction that changes nothing (a zero budget)."""
    b, n, _ = x.shape
    ar = torch.arange(n, device=x.device).expand(b, n)
    return Reduction(x=x, size=size, index=ar, assign=ar)


def empty_batch(x: Tensor, size: Tensor, k: int) -> Reduction:
    """The reduction of an empty batch ``x [0, N, C]``: ``k`` token slots, nothing to score.

    ``k`` is the low end of the method's ``budget``, so the output shapes honour it.
    """
    none = x.new_zeros(0, x.shape[1], dtype=torch.long)
    return Reduction(x[:, :k], size[:, :k], none[:, :k], none)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, N, C]`` at ``index [B, K]`` -> ``[B, K, C]``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def keep_tokens(x: Tensor, size: Tensor, prefix: int, keep: Tensor) -> Reduction:
    """Keep the prefix and the non-prefix tokens at ``keep [B, K]`` (indices into x).

    Kept tokens are returned in their original order, so spatial order survives.
    """
    b, n, _ = x.shape
    keep = keep.sort(dim=1).values
    pre = torch.arange(prefix, device=x.device).expand(b, prefix)
    index = torch.cat([pre, keep], dim=1)  # [B, prefix + K]
    assign = torch.full((b, n), -1, dtype=torch.long, device=x.device)
    slots = torch.arange(index.shape[1], device=x.device).expand(b, -1)
    assign.scatter_(1, index, slots)
    return Reduction(
        x=gather_tokens(x, index), size=gather_tokens(size, index), index=index, assign=assign
    )


class TokenReducer(nn.Module):
    """Base of every method module.

    Subclasses set ``catalog_id`` (the catalog entry), ``kind`` (a mechanism
    term of the taxonomy), ``needs`` (signals beyond ``x`` and ``size``:
    any of ``"keys"``, ``"cls_attn"``, ``"attn"``, ``"attn_logits"``, ``"values"``,
    ``"next_q"``, ``"next_k"``; a host computes only what is named) and ``where`` (``"mid"``:
    after attention and before the MLP, the default; ``"pre"``: before the
    block's attention), and implement ``forward(x, signals) -> Reduction``.
    """

    catalog_id: str = ""
    kind: str = ""
    needs: frozenset[str] = frozenset()
    where: str = "mid"
    # Whether the hosts apply ``Reduction.mask`` to later attention (empty slots and
    # dropped tokens masked out as keys; a soft or differentiable mask as DynamicViT's
    # attention policy). False for a method whose mask means something else.
    masks_attention: ClassVar[bool] = True
    # What the implementation was checked against: "official code", or, where no
    # official code exists, what was read instead (shown on the site).
    basis: str = "official code"
    # Constructor arguments for the shared contract tests: "zero" must be the
    # identity, "some" must remove tokens from the tiny test inputs.
    test_configs: ClassVar[dict[str, dict]] = {"zero": {}, "some": {}}

    def forward(self, x: Tensor, signals: Signals) -> Reduction:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def paper_setting(cls, depth: int, dim: int) -> tuple[dict[int, dict], bool]:
        """The setting the paper reports for a ViT of ``depth`` blocks and width ``dim``.

        Returns constructor kwargs per block index, and whether the host should
        use proportional attention. Empty: the method is not benchmarked.
        """
        return {}, False

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        """Fewest and most output tokens for ``n`` input tokens (equal when exact)."""
        raise NotImplementedError

    def keeps_all(self, n: int, prefix: int) -> bool:
        """True when, on ``n`` tokens, this method returns them unchanged whatever they are
        (a zero budget: ToMe's ``r = 0``). The ViT hosts then neither compute its signals
        nor call it, and record the identity reduction in its place. The default, False,
        is always safe; a method that keeps every token but changes them must keep it."""
        return False


def with_size(signals: Signals, size: Tensor) -> Signals:
    return replace(signals, size=size)
