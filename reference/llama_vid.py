"""LLaMA-VID: two tokens per frame, a text-guided context token and a pooled content token.

Paper: "LLaMA-VID: An Image is Worth 2 Tokens in Large Language Models",
https://arxiv.org/abs/2311.17043
Official code: https://github.com/dvlab-research/LLaMA-VID, ``llamavid/model/llamavid_arch.py``
(``LLaMAVIDMetaModel.initialize_attention_modules`` builds the modules,
``LLaMAVIDMetaForCausalLM.vlm_attention`` and ``token_generation`` run them; the Q-Former is the
LAVIS ``BertLMHeadModel`` of ``llamavid/model/qformer.py``).

Algorithm, per frame of ``N`` patch features ``X`` ``[N, C]``:
1. Text queries: a BLIP-2 Q-Former (BERT-base, cross-attention every second layer) runs 32
   learned queries jointly with the question's tokens and cross-attends to the frame (CLS and
   patches, layer-normalised); ``vlm_att_projector`` maps the 32 query outputs to ``Q`` ``[32, C]``.
2. Context token: ``softmax(Q (X W_k)^T / sqrt(C)) X``, averaged over the 32 queries, then
   ``vlm_att_val_projector`` to the LLM width.
3. Content token: the mean of ``X`` (``compress_type="mean"``; ``"grid:k"`` average-pools to
   ``k x k``), through LLaVA's ``mlp2x_gelu`` projector. The frame gives ``[context, content]``.

Conventions here: video frames arrive as ``features [B, T * N, C]`` (frame after frame), with
``signals.grid = (h, w)`` the grid of ONE frame and ``signals.state["frames"] = T`` (no key:
``T = 1``); the output is ``[B, T * (1 + content), out_dim]``, frame after frame (the official
order). Each frame may carry its CLS first (``T * (1 + N)`` tokens, what the official EVA ViT
emits): then, as the official code, the Q-Former sees CLS and patches and steps 2-3 the patches
only. The question comes in ``signals.state["text"]``: BERT token ids ``[B, L]`` (the official
``bert-base-uncased`` tokenizer of the prompt, ``[DEC]`` added, left-truncated to 256), or their
word embeddings ``[B, L, hidden_size]`` (what ``word_embeddings`` returns), with an optional
``signals.state["text_mask"]`` ``[B, L]`` (1 = token); every frame of a sample gets its text.
Weights: official keys are ``model.vlm_att_*`` and ``model.mm_projector.*``; ``load_official``
strips ``model.``. The default configuration is the video model (EVA ViT-g 1408 -> Vicuna-7B
4096, ``qformer_pretrain``, 32 queries, ``mean``): 217,078,016 parameters, as the official.
The released scripts also train ``"grid:2"`` (video, 5 tokens a frame), ``"grid:4"`` (224 px
images, 1 + 16) and ``None`` (336 px images: the context token and all 576 patches).

Deviations from the official code:
- Batching: the official loops over samples, tokenising each prompt alone; here the batch runs
  at once, padded text masked by ``text_mask`` (as the tokenizer's mask would within a sample).
  One prompt per sample (the official can expand one image over several prompts).
- No text (``state`` without ``"text"``): the queries run alone; the official always has one.
- The CLS of each frame may instead come from ``signals.layers[-1]`` (``[B, T * (1 + N), C]``,
  every frame's CLS then its patches, as the LLaVA host gives it). ``"grid:k"`` pools the
  host's ``(h, w)`` grid with strides ``h // k`` and ``w // k`` (the official assumes a square
  grid, ``int(sqrt(N))``); ``k`` must be > 1 (the official asserts it). The long-video path
  (precomputed features, chunks of 64) is the same arithmetic and is not separate here; fp16
  casting for evaluation is left to the user.
- Only ``bert_type="qformer_pretrain"`` (the released models): ``vlm_att_ln``, an encoder
  width ``att_feat_size`` of 1408 and ``vlm_att_bert_proj`` where ``in_dim`` differs from it.
  ``vocab_size=0`` builds no word table (text must then come embedded).
- The Q-Former is BLIP-2's (LAVIS's BERT with cross-attention): its attention, residual
  and feed-forward blocks are ``reference.blip2``'s; the layer adds the text path.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.blip2 import (
    BertAttention,
    BertIntermediate,
    BertResidual,
    Namespace,
    qformer_bert,
)
from reference.projector import Projector, ProjectorSignals
from reference.registry import register


class QFormerLayer(nn.Module):
    """Self-attention over queries and text; the queries alone cross-attend (some layers); then
    separate FFNs for the queries (``*_query``) and the text."""

    def __init__(self, hidden, heads, intermediate, vision_width, cross, eps, dropout):
        super().__init__()
        self.attention = BertAttention(hidden, heads, hidden, eps, dropout)
        if cross:
            self.crossattention = BertAttention(hidden, heads, vision_width, eps, dropout)
        self.intermediate = BertIntermediate(hidden, intermediate)
        self.output = BertResidual(intermediate, hidden, eps, dropout)
        self.intermediate_query = BertIntermediate(hidden, intermediate)
        self.output_query = BertResidual(intermediate, hidden, eps, dropout)

    def forward(self, x: Tensor, bias: Tensor, image: Tensor, num_query: int) -> Tensor:
        x = self.attention(x, x, bias)
        q, text = x[:, :num_query], x[:, num_query:]
        if hasattr(self, "crossattention"):
            q = self.crossattention(q, image)  # every image token is valid: no mask
        q = self.output_query(self.intermediate_query(q), q)
        return torch.cat([q, self.output(self.intermediate(text), text)], dim=1)


def _content_grid(compress_type: str | None) -> int | None:
    """``k`` of ``"grid:k"``; 0 for ``"mean"``; None for no compression."""
    if compress_type is None:
        return None
    if compress_type == "mean":
        return 0
    match = re.fullmatch(r"grid:(\d+)", compress_type)
    if match is None or int(match.group(1)) < 2:
        raise ValueError(
            f"compress_type must be None, 'mean' or 'grid:k' (k > 1), got {compress_type!r}"
        )
    return int(match.group(1))


@register
class LlamaVid(Projector):
    """Q-Former text queries -> context token (attention over the frame); pooled content token."""

    catalog_id = "llama_vid"
    kind = "compression-tokens"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {
            "in_dim": 32,
            "out_dim": 64,
            "num_query": 4,
            "att_feat_size": 16,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "vocab_size": 0,
            "max_position_embeddings": 16,
        },
    }
    invalid_configs = (
        ({"num_query": 0}, "num_query"),
        ({"compress_type": "grid:1"}, "compress_type"),
        ({"compress_type": "max"}, "compress_type"),
        ({"num_attention_heads": 3}, "num_attention_heads"),
        ({"cross_attention_freq": 0}, "cross_attention_freq"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
    )

    def __init__(
        self,
        in_dim: int = 1408,
        out_dim: int = 4096,
        num_query: int = 32,
        compress_type: str | None = "mean",
        att_feat_size: int = 1408,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        vocab_size: int = 30523,
        max_position_embeddings: int = 512,
        cross_attention_freq: int = 2,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
    ):
        super().__init__()
        if num_query < 1:
            raise ValueError(f"num_query must be >= 1, got {num_query}")
        self.num_query, self.compress_type = num_query, compress_type
        self.grid_size = _content_grid(compress_type)
        # the parameters in initialize_attention_modules' order (the Q-Former first)
        tables = {}
        if vocab_size > 0:  # padding_idx: BERT's pad_token_id
            tables["word_embeddings"] = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
        tables["position_embeddings"] = nn.Embedding(max_position_embeddings, hidden_size)
        bert = qformer_bert(
            hidden_size,
            num_attention_heads,
            intermediate_size,
            att_feat_size,
            num_hidden_layers,
            cross_attention_freq,
            layer_norm_eps,
            dropout,
            layer=QFormerLayer,
            embeddings=tables,
        )
        bert.embeddings.register_buffer(
            "position_ids", torch.arange(max_position_embeddings).expand((1, -1))
        )
        self.vlm_att_encoder = Namespace()
        self.vlm_att_encoder.bert = bert
        self.vlm_att_query = nn.Parameter(0.02 * torch.randn(1, num_query, hidden_size))
        self.vlm_att_projector = nn.Linear(hidden_size, in_dim)
        self.vlm_att_key_projector = nn.Linear(in_dim, in_dim)
        self.vlm_att_val_projector = nn.Linear(in_dim, out_dim)
        self.vlm_att_bert_proj = (
            nn.Linear(in_dim, att_feat_size) if in_dim != att_feat_size else None
        )
        self.vlm_att_ln = nn.LayerNorm(att_feat_size)
        self.mm_projector = nn.Sequential(
            nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )

    def _content_count(self, n: int, grid: tuple[int, int]) -> int:
        if self.grid_size is None:
            return n
        if self.grid_size == 0:
            return 1
        (h, w), k = grid, self.grid_size
        if h < k or w < k:
            raise ValueError(f"compress_type={self.compress_type!r} needs a grid of >= {k}x{k}")
        return (h // (h // k)) * (w // (w // k))

    def num_tokens(self, n: int, frames: int = 1) -> int:
        """Tokens out for ``n`` patch tokens in (``frames`` frames of ``n // frames``)."""
        per = n // frames
        side = math.isqrt(per)
        return frames * (1 + self._content_count(per, (side, side)))

    def text_queries(self, image: Tensor, text: Tensor | None, mask: Tensor | None) -> Tensor:
        """The Q-Former's query outputs mapped to the vision width, ``[B, num_query, C]``.

        Args:
            image: what the Q-Former attends to, ``[B, M, in_dim]`` (CLS and patches).
            text: token ids ``[B, L]`` or word embeddings ``[B, L, hidden_size]``, or None.
            mask: ``[B, L]``, 1 for a token (None: all tokens).
        """
        emb = self.vlm_att_encoder.bert.embeddings
        if self.vlm_att_bert_proj is not None:
            image = self.vlm_att_bert_proj(image)
        image = self.vlm_att_ln(image)
        b = image.shape[0]
        queries = self.vlm_att_query.expand(b, -1, -1)
        if text is None:
            text = queries.new_zeros(b, 0, queries.shape[-1])
        if not text.is_floating_point():
            if not hasattr(emb, "word_embeddings"):
                raise ValueError("token ids need a word table: vocab_size must be > 0")
            text = emb.word_embeddings(text)
        if text.shape[-1] != queries.shape[-1]:
            raise ValueError(
                f"text embeddings must have the Q-Former width {queries.shape[-1]}, "
                f"got {text.shape[-1]} (or give token ids)"
            )
        text = text + emb.position_embeddings(emb.position_ids[:, : text.shape[1]])
        x = emb.dropout(emb.LayerNorm(torch.cat([queries, text.to(queries.dtype)], dim=1)))
        keep = torch.ones(b, x.shape[1], dtype=x.dtype, device=x.device)
        if mask is not None:
            keep[:, self.num_query :] = mask.to(x.dtype)
        bias = ((1.0 - keep) * -10000.0)[:, None, None, :]  # BERT's additive mask
        for layer in self.vlm_att_encoder.bert.encoder.layer:
            x = layer(x, bias, image, self.num_query)
        return self.vlm_att_projector(x[:, : self.num_query])

    def token_generation(self, text_q: Tensor, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[context, content...]`` per frame, ``[B, 1 + content, out_dim]``."""
        scores = text_q @ self.vlm_att_key_projector(patches).transpose(-1, -2)
        scores = scores / math.sqrt(patches.shape[-1])
        ctx = self.vlm_att_val_projector((scores.softmax(-1) @ patches).mean(1, keepdim=True))
        content = patches
        if self.grid_size == 0:
            content = patches.mean(dim=1, keepdim=True)
        elif self.grid_size is not None:
            self._content_count(patches.shape[1], grid)
            (h, w), k = grid, self.grid_size
            if h * w != patches.shape[1]:
                raise ValueError(
                    f"{patches.shape[1]} patches are not a {h}x{w} grid; give signals.grid"
                )
            stride = (h // k, w // k)
            cells = patches.transpose(1, 2).unflatten(2, (h, w))  # [B, C, h, w]
            content = F.avg_pool2d(cells, kernel_size=stride, stride=stride)
            content = content.flatten(2).transpose(1, 2)
        return torch.cat([ctx, self.mm_projector(content)], dim=1)

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        b, total, c = features.shape
        frames = int(signals.state.get("frames", 1))
        if frames < 1 or total % frames:
            raise ValueError(f"frames must divide the {total} tokens, got {frames}")
        per = total // frames
        h, w = signals.grid
        if h * w not in (per, per - 1):  # no grid given: square, CLS first when the count is odd
            side = math.isqrt(per - per % 2)
            h = w = side
        x = features.reshape(b * frames, per, c)
        if per == h * w + 1:
            image, patches = x, x[:, 1:]
        else:
            image, patches = x, x
            last = signals.layers[-1] if signals.layers else None
            if last is not None and last.shape[1] == frames * (per + 1):
                cls = last.reshape(b * frames, per + 1, c)[:, :1]  # each frame's own CLS
                image = torch.cat([cls, x], dim=1)  # [B * T, 1 + N, C], as the ViT emits
        text, mask = signals.state.get("text"), signals.state.get("text_mask")
        if text is not None and frames > 1:
            text = text.repeat_interleave(frames, dim=0)
            mask = None if mask is None else mask.repeat_interleave(frames, dim=0)
        tokens = self.token_generation(self.text_queries(image, text, mask), patches, (h, w))
        return tokens.reshape(b, -1, tokens.shape[-1])  # [B, T * (1 + content), out_dim]


def load_official(method: LlamaVid, state_dict: dict[str, Tensor]) -> None:
    """Load the attention modules and projector of a LLaMA-VID checkpoint (``model.vlm_att_*``,
    ``model.mm_projector.*``; other keys are ignored). The Q-Former's ``position_ids`` buffer is
    filled in where the checkpoint lacks it, as the official loader does."""
    own = method.state_dict()
    loaded = {k.removeprefix("model."): v for k, v in state_dict.items()}
    loaded = {k: v for k, v in loaded.items() if k in own}
    key = "vlm_att_encoder.bert.embeddings.position_ids"
    loaded.setdefault(key, own[key])
    method.load_state_dict(loaded)
