"""QueCC: query-based convolutional cross-attention compression of the visual tokens.

Paper: "Inference Optimal VLMs Need Fewer Visual Tokens and More Parameters" (arXiv v1: "... Need
Only One Visual Token but Larger Models"), https://arxiv.org/abs/2411.03312
Official code: https://github.com/locuslab/llava-token-compression,
``llava/model/multimodal_projector/quecc.py``, class ``QueCC``, which
``llava/model/multimodal_projector/builder.py`` (``build_token_compressor``) puts in front of
LLaVA's ``mlp2x_gelu`` projector; its inputs come from
``llava/model/multimodal_encoder/clip_encoder.py`` (``CLIPVisionTower.forward``).

Algorithm (Sec. 5, Fig. 4):
1. Query injection: the user's question, embedded by the LLM, is projected to the vision width
   and added to every patch feature of the selected CLIP layer.
2. Queries: an MLP of those features, laid out on the ``G x G`` patch grid, is downsampled by a
   depthwise strided convolution (576 patches -> 36 queries in the main setting).
3. Local cross-attention: each query attends only to the keys and values of its own region
   (``G // g`` squared patches), made by MLPs from several CLIP layers concatenated on channels.
4. LLaVA's two-layer MLP maps the compressed tokens to the LLM's width.

Inputs: ``features`` ``[B, N, in_dim]`` is the selected layer's patches; the levels come from
``signals.layers`` as in ``reference.tokenpacker`` (level ``l`` is HF ``hidden_states[l]`` =
``signals.layers[l - 1]``, CLS first; the official levels are 12, 16, 22 and 23 of ViT-L). The
question comes in ``signals.state["text"]``: what the official feeds is ONE vector per image,
the language model's last-layer hidden state (after its final norm) at the last token of the
question (the user turn without ``<image>``, tokenised by the LLM tokenizer with BOS; the
official runs the whole LLM on it), ``[B, text_dim]`` or ``[B, 1, text_dim]``. A sequence
``[B, L, text_dim]`` (the LLM's last-layer states of the question) is reduced to its last
token, the last with ``signals.state["text_mask"]`` ``[B, L]`` = 1 where given, as the official
does under padding. Token ids are refused: the LLM forward is the caller's. Without text
nothing is added (the official always has a question; it falls back to the word "image").
Weights: ``load_official`` maps a checkpoint's ``model.mm_projector.0.*`` (QueCC, official
names) and ``model.mm_projector.{1,3}.*`` (the MLP) onto this module. The defaults are the
released scripts' (``scripts/v1_5/{pretrain,finetune}.sh``: CLIP ViT-L/14-336, Vicuna-7B,
kernel 4, stride 4: 576 -> 36 tokens): 41,988,096 parameters, as the official.

Deviations from the official code:
- The official hard-codes the multi-level width 4096 (``hidden_size``, the input of ``k_proj``
  and ``v_proj``) and 8 heads; here they are ``len(multi_layers) * in_dim`` and ``num_heads``,
  equal at the defaults. The levels are an argument (``multi_layers``).
- Regions are gathered with ``reference.tokenpacker.regions``; a region's keys come in the same
  order as the official ``einops`` chunking.
- Settings the official would crash on (a convolution output that does not tile the grid, a
  grid that is not square) or that do not reduce (``kernel_size = stride = 1``) are refused
  with a ValueError; ``cls_patch`` features (577 tokens, which the official asserts against)
  are not supported.
"""

from __future__ import annotations

import math
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register
from reference.tokenpacker import mlp2, regions


def mlp_norm(cin: int, cout: int) -> nn.Sequential:
    """Linear, GELU, Linear, LayerNorm (the official ``q_proj``, ``k_proj``, ``v_proj``)."""
    return nn.Sequential(
        nn.Linear(cin, cout), nn.GELU(), nn.Linear(cout, cout), nn.LayerNorm(cout, eps=1e-6)
    )


def question_vector(state: dict) -> Tensor | None:
    """The question's vector ``[B, 1, D]`` from ``state["text"]`` (see the module docstring)."""
    text = state.get("text")
    if text is None:
        return None
    if not text.is_floating_point():
        raise ValueError(
            "text must be the language model's hidden states of the question (float), not token "
            "ids: QueCC embeds the question with the whole LLM, which is the caller's to run"
        )
    if text.dim() == 2:
        return text[:, None]
    mask = state.get("text_mask")
    if mask is None:
        return text[:, -1:]
    length = mask.shape[1]
    last = length - 1 - mask.to(torch.long).flip(1).argmax(1)  # the last token with mask 1
    return text[torch.arange(text.shape[0], device=text.device), last][:, None]


@register
class QueCC(Projector):
    """Question-injected, conv-downsampled queries attend to their own region of multi-level
    features; then LLaVA's MLP."""

    catalog_id = "quecc"
    kind = "convolutional-downsampling"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {
            "in_dim": 32,
            "out_dim": 64,
            "text_dim": 32,
            "visual_token_count": 16,
            "kernel_size": 2,
            "stride": 2,
            "multi_layers": (1, 2),
        },
    }
    invalid_configs = (
        ({"stride": 1}, "stride"),  # kernel 2, stride 1 on 4 x 4: a 3 x 3 output
        ({"stride": 0}, "stride"),
        ({"kernel_size": 5}, "kernel_size"),
        ({"kernel_size": 1, "stride": 1}, "kernel_size"),
        ({"visual_token_count": 15}, "visual_token_count"),
        ({"num_heads": 5}, "num_heads"),
        ({"multi_layers": ()}, "multi_layers"),
        ({"multi_layers": (0, 2)}, "multi_layers"),
    )

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        text_dim: int = 4096,
        visual_token_count: int = 576,
        kernel_size: int = 4,
        stride: int = 4,
        num_heads: int = 8,
        multi_layers: tuple[int, ...] = (12, 16, 22, 23),
    ):
        """Defaults: the released LLaVA-1.5-7B scripts (CLIP ViT-L/14 at 336 px, 1024 wide,
        24 x 24 patches; Vicuna-7B, 4096 wide; kernel 4, stride 4: 36 tokens)."""
        super().__init__()
        side = math.isqrt(visual_token_count)
        if visual_token_count < 1 or side * side != visual_token_count:
            raise ValueError(
                f"visual_token_count must be a square number of patches, got {visual_token_count}"
            )
        if not 1 <= kernel_size <= side:
            raise ValueError(
                f"kernel_size must be in [1, {side}] (the grid side), got {kernel_size}"
            )
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        out = (side - kernel_size) // stride + 1  # the convolution's output side
        if side % out:
            raise ValueError(
                f"stride must be such that the convolution's output side divides the grid side "
                f"{side} (each query gets a {side} // g region); kernel {kernel_size}, stride "
                f"{stride} give {out}"
            )
        if out == side:
            raise ValueError("kernel_size must be > 1 where stride is 1 (no reduction otherwise)")
        if num_heads < 1 or in_dim % num_heads:
            raise ValueError(f"num_heads must be a divisor of in_dim ({in_dim}), got {num_heads}")
        if not multi_layers or min(multi_layers) < 1:
            raise ValueError(
                f"multi_layers must be a non-empty list of block numbers >= 1, got {multi_layers}"
            )
        self.visual_token_count, self.side, self.out_side = visual_token_count, side, out
        self.multi_layers = tuple(multi_layers)
        # Creation order as the official builder's (the MLP first, then QueCC's modules), so one
        # seed gives both the same initial weights.
        self.mlp = mlp2(in_dim, out_dim)
        multi = len(multi_layers) * in_dim
        self.clip_attn = nn.MultiheadAttention(in_dim, num_heads, batch_first=True)
        self.q_proj = mlp_norm(in_dim, in_dim)
        self.k_proj = mlp_norm(multi, in_dim)
        self.v_proj = mlp_norm(multi, in_dim)
        self.q_downsample = nn.Conv2d(in_dim, in_dim, kernel_size, stride, groups=in_dim)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.text_projection = nn.Sequential(nn.Linear(text_dim, in_dim), norm(in_dim))

    def num_tokens(self, n: int) -> int:
        return self.out_side**2

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        """``[B, G * G, in_dim]`` -> ``[B, g * g, out_dim]`` (``g`` the convolution's side)."""
        b, n, c = features.shape
        if n != self.visual_token_count:
            raise ValueError(f"got {n} patch tokens; this QueCC takes {self.visual_token_count}")
        if len(signals.layers) < max(self.multi_layers):
            raise ValueError(
                f"multi_layers {self.multi_layers} need {max(self.multi_layers)} vision layers "
                f"in signals.layers, got {len(signals.layers)}"
            )
        multi = torch.cat([signals.layers[i - 1][:, 1:] for i in self.multi_layers], dim=-1)
        x = features
        text = question_vector(signals.state)
        if text is not None:  # Eq. (query injection): one vector, added to every patch
            x = x + self.text_projection(text.to(x.dtype))
        g, side = self.out_side, self.side
        q = self.q_proj(x).transpose(1, 2).reshape(b, c, side, side)  # 'b (h w) d -> b d h w'
        q = self.q_downsample(q).flatten(2).transpose(1, 2)  # [B, g * g, C]
        s = side // g
        key = regions(self.k_proj(multi), side, s).transpose(0, 1)  # [B * g * g, s * s, C]
        value = regions(self.v_proj(multi), side, s).transpose(0, 1)
        out = self.clip_attn(q.reshape(b * g * g, 1, c), key, value, need_weights=False)[0]
        return self.mlp(out.reshape(b, g * g, c))


def load_official(method: QueCC, state_dict: dict[str, Tensor]) -> None:
    """Load a QueCC checkpoint's projector: ``[model.mm_projector.]0.<name>`` (QueCC, the same
    names here) and ``[model.mm_projector.]{1,3}.*`` (the MLP, ``mlp.{0,2}.*`` here); other keys
    are ignored."""
    mapped = {}
    for key, value in state_dict.items():
        key = key.removeprefix("model.mm_projector.")
        head, _, rest = key.partition(".")
        if head == "0":
            mapped[rest] = value
        elif head in ("1", "3"):
            mapped[f"mlp.{int(head) - 1}.{rest}"] = value
    method.load_state_dict(mapped)
