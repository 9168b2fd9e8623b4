"""BLIP-2: the Q-Former, learned queries that cross-attend to the frozen image features.

Paper: "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and
Large Language Models", https://arxiv.org/abs/2301.12597
Official code: https://github.com/salesforce/LAVIS, ``lavis/models/blip2_models/Qformer.py``
(``BertModel``, ``BertLayer``), built by ``Blip2Base.init_Qformer`` (``blip2.py``) and wired to
the LLM by ``Blip2OPT`` (``blip2_opt.py``: ``ln_vision``, ``query_tokens``, ``opt_proj``).

Algorithm (Sec. 3.1, Fig. 2; the image-to-LLM path of Sec. 3.3):
1. Layer-normalise the image encoder's output tokens (``ln_vision``; CLS and patches).
2. 32 learned queries, layer-normalised, go through a 12-layer BERT-base (post-LN): every layer
   self-attends among the queries and has a query FFN; every ``cross_attention_freq``-th layer
   (0, 2, 4, ...) also cross-attends to the image tokens between the two.
3. A linear layer maps the 32 query outputs to the LLM width: 257 tokens (224 px, ViT-g) to 32.

Deviations from the official code:
- Only the query path is built: ``Blip2OPT`` deletes the text embeddings, the MLM head and the
  text FFNs (``layer.intermediate``, ``layer.output``), and the LLM path never feeds text.
  ``load_official`` drops those keys (and the unused ``position_ids`` buffer) from a LAVIS state
  dict and renames ``t5_proj`` / ``llm_proj`` (BLIP-2 FlanT5, InstructBLIP) to ``opt_proj``.
- The CLS token is taken from ``signals.layers[-1]`` where the host gives it (the official
  Q-Former sees all ViT tokens); without it the patches alone are attended (``with_cls=False``
  forces that). ``ln_vision`` is a plain LayerNorm (LAVIS upcasts fp16 input to fp32 inside).
- No attention dropout or masks (all image tokens are valid); eval and train differ only by
  dropout (p=0.1, as BERT's config).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


def _heads(x: Tensor, h: int) -> Tensor:
    return x.unflatten(-1, (h, -1)).transpose(1, 2)  # [B, H, L, D]


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_dim: int, dropout: float):
        super().__init__()
        self.num_attention_heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_dim, hidden)
        self.value = nn.Linear(kv_dim, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor | None = None) -> Tensor:
        """``bias``: an additive attention mask (LLaMA-VID's padded text), or None."""
        h = self.num_attention_heads
        q = _heads(self.query(x), h)
        k, v = _heads(self.key(context), h), _heads(self.value(context), h)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if bias is not None:
            scores = scores + bias
        return (self.dropout(scores.softmax(dim=-1)) @ v).transpose(1, 2).flatten(2)


class BertResidual(nn.Module):
    """``dense``, dropout, then ``LayerNorm`` of the sum with the input (BERT's post-LN)."""

    def __init__(self, d_in: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_dim: int, eps: float, dropout: float):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads, kv_dim, dropout)
        self.output = BertResidual(hidden, hidden, eps, dropout)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor | None = None) -> Tensor:
        return self.output(self.self(x, context, bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # BERT's "gelu": the exact erf form


class QFormerLayer(nn.Module):
    """Self-attention over the queries, cross-attention to the image (some layers), query FFN."""

    def __init__(self, hidden, heads, intermediate, vision_width, cross, eps, dropout):
        super().__init__()
        self.attention = BertAttention(hidden, heads, hidden, eps, dropout)
        if cross:
            self.crossattention = BertAttention(hidden, heads, vision_width, eps, dropout)
        self.intermediate_query = BertIntermediate(hidden, intermediate)
        self.output_query = BertResidual(intermediate, hidden, eps, dropout)

    def forward(self, q: Tensor, image: Tensor) -> Tensor:
        q = self.attention(q, q)
        if hasattr(self, "crossattention"):
            q = self.crossattention(q, image)
        return self.output_query(self.intermediate_query(q), q)


class Namespace(nn.Module):
    """An empty module that only gives its children the official key prefixes."""


def qformer_bert(
    hidden: int,
    heads: int,
    intermediate: int,
    vision_width: int,
    layers: int,
    cross_attention_freq: int,
    eps: float,
    dropout: float,
    layer: type[nn.Module] = QFormerLayer,
    embeddings: dict[str, nn.Module] | None = None,
) -> nn.Module:
    """LAVIS's ``BertModel`` as a Q-Former (the official ``Qformer.bert`` keys):
    ``embeddings`` (the given tables, e.g. ``word_embeddings``, then ``LayerNorm`` and
    ``dropout``) and ``encoder.layer``, ``layers`` of ``layer`` with cross-attention to
    ``vision_width`` features in every ``cross_attention_freq``-th layer from the first.
    A setting BERT cannot express is a ValueError naming the constructor argument
    (``num_attention_heads``, ``cross_attention_freq``, ``num_hidden_layers``)."""
    if heads < 1 or hidden % heads:
        raise ValueError(f"num_attention_heads must be a divisor of {hidden}, got {heads}")
    if cross_attention_freq < 1:
        raise ValueError(f"cross_attention_freq must be >= 1, got {cross_attention_freq}")
    if layers < 1:
        raise ValueError(f"num_hidden_layers must be >= 1, got {layers}")
    bert = Namespace()
    bert.embeddings = Namespace()
    for name, module in (embeddings or {}).items():
        setattr(bert.embeddings, name, module)
    bert.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=eps)
    bert.embeddings.dropout = nn.Dropout(dropout)
    bert.encoder = Namespace()
    bert.encoder.layer = nn.ModuleList(
        layer(hidden, heads, intermediate, vision_width, cross, eps, dropout)
        for cross in (i % cross_attention_freq == 0 for i in range(layers))
    )
    return bert


@register
class Blip2(Projector):
    """``ln_vision``, the Q-Former (``Qformer.bert``) over ``query_tokens``, then ``opt_proj``."""

    catalog_id = "blip2"
    kind = "resampling"
    count_argument = "num_query_token"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {
            "in_dim": 32,
            "out_dim": 64,
            "num_query_token": 4,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
        },
    }
    invalid_configs = (
        ({"num_query_token": 0}, "num_query_token"),
        ({"num_attention_heads": 3}, "num_attention_heads"),
        ({"cross_attention_freq": 0}, "cross_attention_freq"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
    )

    def __init__(
        self,
        in_dim: int = 1408,
        out_dim: int = 2560,
        num_query_token: int = 32,
        cross_attention_freq: int = 2,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
        with_cls: bool = True,
    ):
        super().__init__()
        if num_query_token < 1:
            raise ValueError(f"num_query_token must be >= 1, got {num_query_token}")
        self.num_query_token, self.with_cls = num_query_token, with_cls
        self.ln_vision = nn.LayerNorm(in_dim)
        self.query_tokens = nn.Parameter(0.02 * torch.randn(1, num_query_token, hidden_size))
        bert = qformer_bert(
            hidden_size,
            num_attention_heads,
            intermediate_size,
            in_dim,
            num_hidden_layers,
            cross_attention_freq,
            layer_norm_eps,
            dropout,
        )
        self.Qformer = Namespace()
        self.Qformer.bert = bert
        self.opt_proj = nn.Linear(hidden_size, out_dim)

    def num_tokens(self, n: int) -> int:
        return self.num_query_token

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        image = features
        last = signals.layers[-1] if signals.layers else None
        if self.with_cls and last is not None and last.shape[1] == features.shape[1] + 1:
            image = torch.cat([last[:, :1], features], dim=1)  # [B, 1 + N, C_v], as the ViT emits
        image = self.ln_vision(image)
        bert = self.Qformer.bert
        q = bert.embeddings.dropout(bert.embeddings.LayerNorm(self.query_tokens))
        q = q.expand(image.shape[0], -1, -1)
        for layer in bert.encoder.layer:
            q = layer(q, image)
        return self.opt_proj(q)


def load_official(method: Blip2, state_dict: dict[str, Tensor]) -> None:
    """Load a LAVIS BLIP-2 state dict (``Blip2OPT``, ``Blip2T5``, ``Blip2VicunaInstruct``, or a
    stage-1 ``Blip2Qformer``): keys this module has no part for are dropped; every key it has must
    be present."""
    renamed = {}
    for key, value in state_dict.items():
        for prefix in ("t5_proj.", "llm_proj."):
            if key.startswith(prefix):
                key = "opt_proj." + key.removeprefix(prefix)
        renamed[key] = value
    own = method.state_dict().keys()
    method.load_state_dict({k: v for k, v in renamed.items() if k in own})
