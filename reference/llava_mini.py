"""LLaVA-Mini: modality pre-fusion into the text, then one vision token per image or frame.

Paper: "LLaVA-Mini: Efficient Image and Video Large Multimodal Models with One Vision Token",
https://arxiv.org/abs/2501.03895
Official code: https://github.com/ictnlp/LLaVA-Mini, ``llavamini/model/llavamini_arch.py``
(``Resampler``; ``LlavaMiniMetaModel.build_compressor`` builds ``compressor`` and
``prefusion_layers``; ``LlavaMiniMetaForCausalLM.encode_images_mini`` runs them, and
``prepare_inputs_labels_for_multimodal`` averages the fused text over a video's frames).

Algorithm, per image (or frame) of ``N`` patch features ``X`` ``[N, C_v]`` and the prompt's
LLM embeddings ``E`` ``[L, hidden]``:
1. Compression: ``C x C`` learned queries (``compressor_size``, 1 in the released model)
   cross-attend to ``X`` (Qwen-VL's resampler: 2-D sin-cos positions on queries and keys), then
   LLaVA's MLP projector maps them to ``hidden``: ``Z`` ``[C*C, hidden]``.
2. Modality pre-fusion: ``prefusion_layer_num`` (4) LLaMA decoder layers run causally over
   ``[mm_projector(X); Z; E]`` (the prompt's padding and image placeholder masked, positions
   renumbered over the valid tokens).
3. The LLM gets the pre-fusion outputs at ``Z``'s places (the vision tokens) and at ``E``'s
   places (the fused text; masked text keeps its embedding). Video: per frame, ``C*C`` tokens
   a frame, the fused text averaged over the frames.

Here: ``forward`` returns the vision tokens ``[B, T * C*C, out_dim]`` (frames as in
``reference.llama_vid``: ``features [B, T * N, C_v]``, ``signals.state["frames"] = T``). The
prompt comes in ``signals.state["text_embeds"]`` ``[B, L, out_dim]`` (the LLM's own token
embeddings, the whole prompt) with ``signals.state["text_mask"]`` ``[B, L]`` (1 = a token the
pre-fusion sees: not padding, not the image placeholder, not answer tokens in training); the
fused text is written to ``signals.state["fused_text"]`` ``[B, L, out_dim]``, which the LLaVA
host (``fuses_text``) puts in place of the prompt's embeddings, giving it its own prompt's
embeddings when the caller gives none.

Default configuration: the paper's LLaVA-Mini on Vicuna-7B with CLIP ViT-L/336 (1024 -> 4096,
576 patches to 1 token, 4 pre-fusion layers): 834,717,696 parameters, as the official.

Deviations from the official code:
- The pre-fusion layers are the LLaVA host's ``DecoderLayer`` (same arithmetic as transformers'
  ``LlamaDecoderLayer``, flat names): ``load_official`` maps ``prefusion_layers.i.self_attn.*``
  and ``.mlp.*`` onto them and strips ``model.``; ``compressor.pos_embed`` is a persistent
  buffer (a frozen Parameter there: same key and values; the test counts it).
- The compressor is ``reference.qwen_vl.Resampler`` (the same module, LayerNorm eps 1e-5 as
  here); its width is ``in_dim`` and its heads ``compressor_heads`` (the official hard-codes
  1024 and 8, CLIP-L's width: the defaults), so tiny widths run.
- No text (``state`` without ``"text_embeds"``): the pre-fusion runs over the image tokens
  alone. The high-resolution path (``resolution_ratio`` > 1, sub-images) is not here.
- Gradients reach every part on video too (the official runs a batched video, ``images`` of
  6 dimensions, under ``no_grad`` and trains only through its list-of-videos path).
- Batching: the official splices each sample's prompt alone; here the pre-fusion runs on the
  padded batch, ``text_mask`` masking the padding as the official's ``input_ids <= 0`` does.
- The released checkpoint (LLaMA-3.1-8B) needs ``num_key_value_heads=8``,
  ``intermediate_size=14336`` and LLaMA-3.1's scaled RoPE, which the host's ``rope`` lacks.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.hosts.llava import DecoderLayer, LlavaConfig
from reference.projector import Projector, ProjectorSignals
from reference.qwen_vl import Resampler
from reference.registry import register


def prefusion(
    layers: nn.ModuleList, image: Tensor, compressed: Tensor, text: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Run the pre-fusion layers over ``[image; compressed; text]`` (Sec. 4.2).

    Args:
        image: all projected patch tokens ``[B, N, D]``.
        compressed: the compressed vision tokens ``[B, M, D]``.
        text: the prompt's embeddings ``[B, L, D]``.
        mask: ``[B, L]``, True for a text token the pre-fusion sees.

    Returns:
        The vision tokens ``[B, M, D]`` and the fused text ``[B, L, D]`` (the input embedding
        where ``mask`` is False).
    """
    b, n, m = image.shape[0], image.shape[1], compressed.shape[1]
    valid = torch.cat([mask.new_ones(b, n + m), mask], dim=1)  # [B, S]
    positions = valid.long().cumsum(1) - 1
    positions = positions.masked_fill(~valid, 1)  # unused: masked keys are never attended
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    attn = causal[None, None] & valid[:, None, None, :]  # [B, 1, S, S]; row 0 is never empty
    x = torch.cat([image, compressed, text.to(image.dtype)], dim=1)
    for layer in layers:
        x = layer(x, positions, attn, None, frozenset(), None)[0]
    fused = torch.where(mask[..., None], x[:, n + m :], text.to(x.dtype))
    return x[:, n : n + m], fused


@register
class LlavaMini(Projector):
    """A resampler to ``compressor_size**2`` tokens, fused with the prompt by LLaMA layers."""

    catalog_id = "llava_mini"
    kind = "resampling"
    fuses_text: ClassVar[bool] = True  # writes state["fused_text"] for the prompt (see above)
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {
            "in_dim": 32,
            "out_dim": 64,
            "compressor_size": 2,
            "compressor_heads": 4,
            "prefusion_layer_num": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
        },
    }
    invalid_configs = (
        ({"compressor_size": 0}, "compressor_size"),
        ({"compressor_heads": 3}, "compressor_heads"),
        ({"num_attention_heads": 3}, "num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"prefusion_layer_num": -1}, "prefusion_layer_num"),
        ({"in_dim": 30, "compressor_heads": 2}, "in_dim"),
    )

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 4096,
        compressor_size: int = 1,
        compressor_heads: int = 8,
        prefusion_layer_num: int = 4,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 32,
        intermediate_size: int = 11008,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        if compressor_size < 1:
            raise ValueError(f"compressor_size must be >= 1, got {compressor_size}")
        if compressor_heads < 1 or in_dim % compressor_heads:
            raise ValueError(
                f"compressor_heads must be >= 1 and divide in_dim={in_dim}, got {compressor_heads}"
            )
        if in_dim % 4:
            raise ValueError(
                f"in_dim must be a multiple of 4 (2-D sin-cos positions), got {in_dim}"
            )
        if num_attention_heads < 1 or out_dim % num_attention_heads:
            raise ValueError(
                f"num_attention_heads must be >= 1 and divide out_dim={out_dim}, "
                f"got {num_attention_heads}"
            )
        if num_key_value_heads < 1 or num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads must be >= 1 and divide "
                f"num_attention_heads={num_attention_heads}, got {num_key_value_heads}"
            )
        if prefusion_layer_num < 0:
            raise ValueError(f"prefusion_layer_num must be >= 0, got {prefusion_layer_num}")
        self.compressor_size = compressor_size
        self.mm_projector = nn.Sequential(
            nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )
        # embed_dim is the vision width (the official hard-codes CLIP-L's 1024), no kv_proj
        self.compressor = Resampler(compressor_size, in_dim, compressor_heads, kv_dim=in_dim)
        self.compressor.ln_q.eps = self.compressor.ln_kv.eps = 1e-5  # nn.LayerNorm's default
        llm = LlavaConfig(
            vision={},
            vision_layer=0,
            hidden=out_dim,
            layers=prefusion_layer_num,
            heads=num_attention_heads,
            kv_heads=num_key_value_heads,
            intermediate=intermediate_size,
            vocab=0,
            rope_theta=rope_theta,
            eps=rms_norm_eps,
        )
        self.prefusion_layers = nn.ModuleList(DecoderLayer(llm) for _ in range(prefusion_layer_num))

    @classmethod
    def count_setting(cls, keep: int, n_image: int) -> dict | None:
        """``keep`` tokens from a ``sqrt(keep)`` query grid (a square up to ``n_image``)."""
        side = math.isqrt(keep) if keep > 0 else 0
        return {"compressor_size": side} if side and side * side == keep <= n_image else None

    def num_tokens(self, n: int, frames: int = 1) -> int:
        """Vision tokens out: ``compressor_size**2`` per frame."""
        return frames * self.compressor_size**2

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        b, total, c = features.shape
        frames = int(signals.state.get("frames", 1))
        if frames < 1 or total % frames:
            raise ValueError(f"frames must divide the {total} tokens, got {frames}")
        n = total // frames
        if self.compressor_size**2 > n:
            raise ValueError(
                f"compressor_size must be <= {math.isqrt(n)} for {n} patches a frame "
                f"(more queries than inputs), got {self.compressor_size}"
            )
        h, w = signals.grid
        grid = (h, w) if h * w == n else (math.isqrt(n),) * 2
        if grid[0] * grid[1] != n:
            raise ValueError(f"{n} patch tokens are not a square grid; give signals.grid")
        x = features.reshape(b * frames, n, c)
        compressed = self.mm_projector(self.compressor(x, grid))  # [B*T, C*C, D]
        image = self.mm_projector(x)
        text = signals.state.get("text_embeds")
        if text is None:
            text = image.new_zeros(b, 0, image.shape[-1])
        mask = signals.state.get("text_mask")
        mask = (
            torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            if mask is None
            else mask.bool()
        )
        tokens, fused = prefusion(
            self.prefusion_layers,
            image,
            compressed,
            text.repeat_interleave(frames, dim=0),
            mask.repeat_interleave(frames, dim=0),
        )
        # a video's fused text: the mean over its frames (in float32, as the official sums)
        fused = fused.float().unflatten(0, (b, frames)).mean(1).to(fused.dtype)
        signals.state["fused_text"] = fused
        return tokens.reshape(b, -1, tokens.shape[-1])  # [B, T * C*C, out_dim]


def official_key(key: str) -> str:
    """An official checkpoint key as this module names it (other modules' keys pass as they are)."""
    key = key.removeprefix("model.")
    if key.startswith("prefusion_layers."):
        key = key.replace(".self_attn.", ".").replace(".mlp.", ".")
    return key


def load_official(method: LlavaMini, state_dict: dict[str, Tensor]) -> None:
    """Load ``model.mm_projector.*``, ``model.compressor.*`` and ``model.prefusion_layers.*`` of
    a LLaVA-Mini checkpoint (other keys, and RoPE's ``inv_freq`` buffers, are ignored)."""
    own = method.state_dict()
    loaded = {official_key(k): v for k, v in state_dict.items()}
    method.load_state_dict({k: v for k, v in loaded.items() if k in own})
