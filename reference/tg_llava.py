"""TG-LLaVA: text-guided latent embeddings refine the visual tokens and resample high-res crops.

Paper: "TG-LLaVA: Text Guided LLaVA via Learnable Latent Embeddings",
https://arxiv.org/abs/2409.09564
Official code: https://github.com/AIDC-AI/TG-LLaVA: ``tg_llava/model/multimodal_cross_attention/
builder.py`` (``CrossAttentionLearnableQueryModule``: TG-FOM, with the LAVIS ``Qformer.py``),
``tg_llava/model/multimodal_patch_encoder/builder.py`` (``mm_patch_encoder`` with
``Idefics2PerceiverResampler``: TG-DP), wired by ``encode_images`` of
``tg_llava/model/llava_arch_cross_zeroAdd_learnable_query.py``; the crops are made in
``tg_llava/train/train_cross_zeroAdd_learnable_query.py`` (``LazySupervisedDataset``).

Algorithm (Sec. 3, Figs. 2-4):
1. TG-FOM: 576 learned queries run through a 2-layer BERT-large Q-Former that cross-attends (layer
   0) to the instruction's pooled CLIP text embedding; a zero-initialised linear layer turns the
   576 outputs into a mask ADDED to the 576 patch features, which LLaVA's MLP then projects.
2. TG-DP: the image, upsampled 2x, is cut into 4 crops; their 4 x 576 patch features (+ learned
   positions, an MLP) are resampled by 64 perceiver latents: layer 0 attends to the instruction's
   CLIP token states, layer 1 to the crop features (Idefics2's perceiver: RMSNorm, GQA, SwiGLU).
3. The LLM gets the 576 guided tokens, then the 64 detail tokens (2880 patch tokens in, 640 out).

Inputs: ``features [B, (1 + crops) * N, in_dim]``: the global view's ``N`` patches (selected
layer, CLS dropped), then each crop's ``N`` (row-major crops of the 2x-upsampled image, crop
after crop). The instruction comes from the frozen CLIP text encoder (the official ``text_tower``,
CLIP ViT-L/14-336's, fed the last human turn without ``<image>``, at most 77 tokens):
``signals.state["text"]`` is its ``last_hidden_state [B, L, text_dim]`` and
``signals.state["text_pooled"]`` its ``pooler_output [B, text_dim]``; without ``text_pooled``
the pooled vector is the last token of ``text`` (the last with ``state["text_mask"]`` = 1),
which is CLIP's pooled EOS token when the prompt ends there. Token ids are refused (the text
tower is the caller's). As the official, the perceiver attends to every given text token (no
mask). Without text, TG-FOM adds nothing and the text layer sees the latents alone.
The defaults (CLIP ViT-L/14-336 -> a 4096-wide LLM, 576 queries, 4 crops, 64 latents) have
112,130,048 parameters; the official modules have 161,782,586, the 49,652,538 more being
Q-Former parts the query path never reaches (next paragraph).

Deviations from the official code:
- Only the query path of the Q-Former is built (as ``reference.blip2``, whose layers are used):
  the official keeps BERT's word and position embeddings, the text FFNs (``layer.intermediate``,
  ``layer.output``) and the MLM head (``cls``), unused by ``Qformer.bert(query_embeds=...)``;
  ``load_official`` drops those keys. Names are otherwise the official ones
  (``mm_cross_attn.*``, ``mm_patch_encoder.*``, ``mm_projector.{0,2}.*``).
- The official hard-codes 768 (text width), 576 (queries), 2304 (crop tokens), 1024 (perceiver
  width), 64 latents and depth 2; here they are ``text_dim``, ``num_query``, ``crops *
  num_query``, ``in_dim``, ``n_latents``, ``depth`` (the official at the defaults). The
  Q-Former width is ``in_dim`` (the official's bert-large 1024 must equal it for
  ``zero_layer``).
- As the official, the TG-FOM queries cross-attend to ONE key (the pooled text): the softmax is
  1, so that attention's ``query`` and ``key`` weights never get a gradient.
- The crops come in ``features``; making them (upsampling, cutting, the vision tower) is the
  caller's. In the LLaVA host, which has one view, its patches are read as the views.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.blip2 import Namespace, qformer_bert
from reference.hosts.llava import RMSNorm
from reference.projector import Projector, ProjectorSignals
from reference.registry import register
from reference.tokenpacker import mlp2


class PerceiverAttention(nn.Module):
    """Idefics2's perceiver attention: latent queries; keys and values of [context, latents]."""

    def __init__(self, hidden: int, heads: int, head_dim: int, kv_heads: int):
        super().__init__()
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, latents: Tensor, context: Tensor) -> Tensor:
        both = torch.cat([context, latents], dim=1)
        q = self.q_proj(latents).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, M, D]
        k = self.k_proj(both).unflatten(-1, (self.kv_heads, -1)).transpose(1, 2)
        v = self.v_proj(both).unflatten(-1, (self.kv_heads, -1)).transpose(1, 2)
        rep = self.heads // self.kv_heads  # grouped-query attention: head h reads kv h // rep
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        attn = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # fp32 softmax, as official
        return self.o_proj((attn @ v).transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PerceiverLayer(nn.Module):
    """Pre-norm perceiver block (the latents and the context normed apart), then SwiGLU."""

    def __init__(self, hidden: int, heads: int, head_dim: int, kv_heads: int, eps: float):
        super().__init__()
        self.input_latents_norm = RMSNorm(hidden, eps)
        self.input_context_norm = RMSNorm(hidden, eps)
        self.self_attn = PerceiverAttention(hidden, heads, head_dim, kv_heads)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = SwiGLU(hidden, 4 * hidden)

    def forward(self, latents: Tensor, context: Tensor) -> Tensor:
        latents = latents + self.self_attn(
            self.input_latents_norm(latents), self.input_context_norm(context)
        )
        return latents + self.mlp(self.post_attention_layernorm(latents))


def instruction(state: dict) -> tuple[Tensor | None, Tensor | None]:
    """The CLIP text tower's ``(last_hidden_state [B, L, D], pooler_output [B, D])``."""
    text, pooled = state.get("text"), state.get("text_pooled")
    for t in (text, pooled):
        if t is not None and not t.is_floating_point():
            raise ValueError(
                "text must be the CLIP text encoder's hidden states (float), not token ids: "
                "the text tower is the caller's to run"
            )
    if text is not None and text.dim() == 2:
        text = text[:, None]
    if pooled is None and text is not None:
        mask = state.get("text_mask")
        last = torch.full((text.shape[0],), text.shape[1] - 1, device=text.device)
        if mask is not None:  # the last token with mask 1
            last = last - mask.to(torch.long).flip(1).argmax(1)
        pooled = text[torch.arange(text.shape[0], device=text.device), last]
    return text, pooled


@register
class TGLLaVA(Projector):
    """TG-FOM (text-guided mask added to the patches) + TG-DP (text-guided perceiver over crops)."""

    catalog_id = "tg_llava"
    kind = "resampling"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {
            "in_dim": 32,
            "out_dim": 64,
            "text_dim": 32,
            "num_query": 4,
            "crops": 3,
            "n_latents": 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "resampler_n_heads": 2,
            "resampler_head_dim": 8,
            "num_key_value_heads": 1,
        },
    }
    invalid_configs = (
        ({"num_query": 0}, "num_query"),
        ({"crops": 0}, "crops"),
        ({"n_latents": 0}, "n_latents"),
        ({"n_latents": 13}, "n_latents"),  # not fewer tokens out than the 16 in
        ({"depth": 1}, "depth"),
        ({"num_attention_heads": 3}, "num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    )

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        text_dim: int = 768,
        num_query: int = 576,
        crops: int = 4,
        n_latents: int = 64,
        depth: int = 2,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 16,
        intermediate_size: int = 4096,
        cross_attention_freq: int = 2,
        resampler_n_heads: int = 16,
        resampler_head_dim: int = 96,
        num_key_value_heads: int = 4,
        layer_norm_eps: float = 1e-12,
        rms_norm_eps: float = 1e-5,
        dropout: float = 0.1,
    ):
        super().__init__()
        for name, value in (("num_query", num_query), ("crops", crops), ("n_latents", n_latents)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_query + n_latents >= (1 + crops) * num_query:
            raise ValueError(
                f"n_latents must be below crops * num_query = {crops * num_query} (fewer tokens "
                f"out than in), got {n_latents}"
            )
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (a text layer, then crop layers), got {depth}")
        if num_attention_heads < 1 or in_dim % num_attention_heads:
            raise ValueError(
                f"num_attention_heads must be a divisor of in_dim={in_dim}, got "
                f"{num_attention_heads}"
            )
        if num_key_value_heads < 1 or resampler_n_heads % num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads must be a divisor of resampler_n_heads={resampler_n_heads}, "
                f"got {num_key_value_heads}"
            )
        self.num_query, self.crops, self.n_latents = num_query, crops, n_latents
        # LlavaMetaTextLearnableQueryModel's modules, in its order
        self.mm_projector = mlp2(in_dim, out_dim)
        cross = self.mm_cross_attn = Namespace()
        cross.resize_linear = nn.Linear(text_dim, in_dim)
        cross.zero_layer = nn.Linear(in_dim, in_dim)
        nn.init.zeros_(cross.zero_layer.weight)  # the mask starts at zero: plain LLaVA at first
        nn.init.zeros_(cross.zero_layer.bias)
        bert = qformer_bert(
            in_dim,
            num_attention_heads,
            intermediate_size,
            in_dim,
            num_hidden_layers,
            cross_attention_freq,
            layer_norm_eps,
            dropout,
        )
        for m in bert.modules():  # BertPreTrainedModel._init_weights
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        cross.Qformer = Namespace()
        cross.Qformer.bert = bert
        cross.query_tokens = nn.Parameter(0.02 * torch.randn(1, num_query, in_dim))
        patch = self.mm_patch_encoder = Namespace()
        patch.position_embedding = nn.Embedding(crops * num_query, in_dim)
        patch.pre_mlp = mlp2(in_dim, in_dim)
        patch.proj = mlp2(in_dim, out_dim)
        patch.perceiver = Namespace()
        patch.perceiver.latents = nn.Parameter(0.02 * torch.randn(n_latents, in_dim))
        patch.perceiver.layers = nn.ModuleList(
            PerceiverLayer(
                in_dim, resampler_n_heads, resampler_head_dim, num_key_value_heads, rms_norm_eps
            )
            for _ in range(depth)
        )
        patch.perceiver.norm = RMSNorm(in_dim, rms_norm_eps)
        patch.resize_linear = nn.Linear(text_dim, in_dim)

    def num_tokens(self, n: int) -> int:
        return self.num_query + self.n_latents

    def guidance(self, pooled: Tensor) -> Tensor:
        """TG-FOM: the text-guided mask ``[B, num_query, C]`` from the pooled text ``[B, D]``."""
        cross = self.mm_cross_attn
        text = cross.resize_linear(pooled)[:, None]  # [B, 1, C]: one key for the queries
        emb = cross.Qformer.bert.embeddings
        q = emb.dropout(emb.LayerNorm(cross.query_tokens)).expand(text.shape[0], -1, -1)
        for layer in cross.Qformer.bert.encoder.layer:
            q = layer(q, text)
        return cross.zero_layer(q)

    def details(self, crops: Tensor, text: Tensor | None) -> Tensor:
        """TG-DP: ``[B, crops * N, C]`` crop features -> ``[B, n_latents, out_dim]``."""
        patch = self.mm_patch_encoder
        x = patch.pre_mlp(crops + patch.position_embedding.weight)
        b = x.shape[0]
        context = x.new_zeros(b, 0, x.shape[-1]) if text is None else patch.resize_linear(text)
        latents = patch.perceiver.latents.expand(b, -1, -1)
        for i, layer in enumerate(patch.perceiver.layers):  # the text first, then the crops
            latents = layer(latents, context.to(latents.dtype) if i == 0 else x)
        return patch.proj(patch.perceiver.norm(latents))

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        """``[B, (1 + crops) * N, in_dim]`` -> ``[B, N + n_latents, out_dim]``."""
        n, views = self.num_query, 1 + self.crops
        if features.shape[1] != views * n:
            raise ValueError(
                f"got {features.shape[1]} patch tokens; this TG-LLaVA takes {views} views "
                f"(the image, then {self.crops} crops) of {n}"
            )
        text, pooled = instruction(signals.state)
        base = features[:, :n]
        if pooled is not None:
            base = base + self.guidance(pooled.to(features.dtype))
        tokens = self.mm_projector(base)
        details = self.details(features[:, n:], None if text is None else text.to(features.dtype))
        return torch.cat([tokens, details], dim=1)


def load_official(method: TGLLaVA, state_dict: dict[str, Tensor]) -> None:
    """Load a TG-LLaVA checkpoint's ``[model.]mm_projector.*``, ``mm_cross_attn.*`` and
    ``mm_patch_encoder.*``; the Q-Former parts not built here, buffers and other keys are
    dropped; every key this module has must be present."""
    own = method.state_dict().keys()
    loaded = {k.removeprefix("model."): v for k, v in state_dict.items()}
    method.load_state_dict({k: v for k, v in loaded.items() if k in own})
